"""A Llama decoder and loader written against fairscale the way Meta's reference code is, for the tests.

Not Meta's code (its license is not ours): our own model, with the imports, constructor calls and
loading steps of Meta's ``llama/model.py`` and ``llama/generation.py`` (meta-llama/llama, llama3,
llama-models), so that ``tests/fairscale/test_fairscale_compat.py`` can run it twice: as written, on
fairscale 0.4.13, and after ``sed -i 's/fairscale\\.nn\\.model_parallel/tp_ffn.fairscale/g'`` (the
test applies the same substitution to this file's text), on tp_ffn. What it reproduces:

- ``import fairscale.nn.model_parallel.initialize as fs_init``; local head counts from
  ``fs_init.get_model_parallel_world_size()``;
- every linear built with ``init_method=lambda x: x``; ``wq/wk/wv`` column-parallel with
  ``gather_output=False``, ``wo`` row-parallel with ``input_is_parallel=True``; ``w1/w3`` column,
  ``w2`` row; the output head column-parallel with ``gather_output=True``;
- ``tok_embeddings``: ``VocabParallelEmbedding`` (Llama 3) or ``ParallelEmbedding`` (Llama 2);
- a per-layer KV cache ``[max_batch, max_seq, local kv heads, head_dim]`` (Meta allocates it with
  ``.cuda()``; here it follows the default device, as in llama-models);
- the loader: ``initialize_model_parallel`` unless initialised, one ``consolidated.XX.pth`` per
  model-parallel rank (the count must equal the model-parallel size), ``torch.load`` of this rank's
  file, ``params.json`` into ``ModelArgs``, the model built under the default dtype, and
  ``load_state_dict(strict=True)``.

Rotary embeddings rotate adjacent channel pairs (Meta's convention); the angles are computed in
float32 and the rotation in the model's dtype. The norms and the softmax run in float32 whatever
the model's dtype, as in Meta's code and in Hugging Face's ``LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_rank,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    vocab_parallel_embedding: bool = True  # Llama 3; False: Llama 2's ParallelEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model's dtype, as Meta's and Hugging Face's norms do.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [length, head_dim / 2]``, computed in float32."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x [b, s, heads, head_dim]`` by the angles of positions ``cos/sin [s, head_dim/2]``."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = self.n_kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        q, kv = args.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, q, bias=False, gather_output=False, init_method=lambda x: x)
        self.wk = ColumnParallelLinear(args.dim, kv, bias=False, gather_output=False, init_method=lambda x: x)
        self.wv = ColumnParallelLinear(args.dim, kv, bias=False, gather_output=False, init_method=lambda x: x)
        self.wo = RowParallelLinear(q, args.dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        cache = (args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(cache)
        self.cache_v = torch.zeros(cache)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_local_kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.cache_k = self.cache_k.to(q)
        self.cache_v = self.cache_v.to(q)
        self.cache_k[:b, start_pos : start_pos + s] = k
        self.cache_v[:b, start_pos : start_pos + s] = v
        keys = self.cache_k[:b, : start_pos + s].repeat_interleave(self.n_rep, dim=2)
        values = self.cache_v[:b, : start_pos + s].repeat_interleave(self.n_rep, dim=2)
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)  # float32, as Meta's and Hugging Face's
        out = (probs @ values).transpose(1, 2).reshape(b, s, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        self.params = params
        embedding = VocabParallelEmbedding if params.vocab_parallel_embedding else ParallelEmbedding
        self.tok_embeddings = embedding(params.vocab_size, params.dim, init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)
        self.cos, self.sin = rope_tables(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` of ``tokens [b, s]`` at positions ``start_pos ...`` (the cache holds the rest)."""
        _, s = tokens.shape
        h = self.tok_embeddings(tokens)
        cos, sin = self.cos[start_pos : start_pos + s], self.sin[start_pos : start_pos + s]
        mask = None
        if s > 1:
            # Query i (position start_pos + i) sees the cached positions and itself, not later ones.
            future = torch.ones(s, start_pos + s, dtype=torch.bool).triu(start_pos + 1)
            mask = torch.zeros(s, start_pos + s, dtype=h.dtype).masked_fill(future, float("-inf"))
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return self.output(self.norm(h))  # Meta's adds .float(); the tests compare float64 logits


def build(
    ckpt_dir: str, max_seq_len: int, max_batch_size: int, model_parallel_size: int, vocab_parallel_embedding: bool
) -> Transformer:
    """Load Meta ``consolidated.XX.pth`` shards the way Meta's ``Llama.build`` does."""
    if not model_parallel_is_initialized():
        initialize_model_parallel(model_parallel_size)
    checkpoints = sorted(Path(ckpt_dir).glob("*.pth"))
    assert len(checkpoints) > 0, f"no checkpoint files found in {ckpt_dir}"
    assert model_parallel_size == len(checkpoints), (
        f"Loading a checkpoint for MP={len(checkpoints)} but world size is {model_parallel_size}"
    )
    checkpoint = torch.load(checkpoints[get_model_parallel_rank()], map_location="cpu", weights_only=True)
    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    args = ModelArgs(
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        vocab_parallel_embedding=vocab_parallel_embedding,
        **params,
    )
    model = Transformer(args)
    model.load_state_dict(checkpoint, strict=True)
    return model
