"""A compact Llama-style decoder whose attention and feed-forward blocks are tensor-parallel.

Heads are split over the TP group the way Meta's code does it: wq, wk, wv column-parallel (each rank
holds ``n_heads / W`` query heads and ``n_kv_heads / W`` key/value heads), wo row-parallel; the
feed-forward block is :class:`~tp_ffn.ParallelFeedForward`. Token embeddings, norms and the
rotary tables are replicated; the output head is column-parallel over the vocabulary and gathers
the logits, so every TP rank sees the full ``[batch, seq, vocab]`` logits.

Rotary embeddings use Meta's convention (adjacent pairs of each head's channels rotate together);
Hugging Face checkpoints store wq/wk permuted for their half-split convention, which the loaders
in :mod:`tp_ffn.models` undo.

With ``sequence_parallel`` the residual stream between blocks is ``[b, s/W, dim]``: each block
all-gathers on entry and reduce-scatters on exit, and the replicated norm weights have their
gradients all-reduced over the group (each rank's norm sees only its own tokens).

Generation passes a :class:`~tp_ffn.models.kv_cache.KVCache` and the position of the first token,
``model(tokens, start_pos=p, cache=cache)``: each rank caches its own key/value heads, so a step
costs the new positions only (see :mod:`tp_ffn.train.run.generate`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm import copy_to_parallel, gather_from_sequence, split_sequence
from ..ffn import ParallelFeedForward
from ..groups import GroupLike, TPGroup, resolve_group
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..moe import ParallelMoEFeedForward, load_balancing_loss
from .config import PRESETS, LlamaConfig  # re-exported: their home was here
from .kv_cache import KVCache, LayerKV
from .loading import load_weights
from .pretrained_config import config_from_pretrained

__all__ = ["PRESETS", "LlamaConfig", "Transformer", "load_pretrained", "precompute_rope"]


def precompute_rope(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """``cos, sin [seq_len, head_dim / 2]`` of Meta's rotary embedding, in float32."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x [b, s, heads, head_dim]`` by the position angles."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm with a replicated weight; under sequence parallelism its gradient is all-reduced."""

    def __init__(self, dim: int, eps: float, tp: TPGroup, sequence_parallel: bool, dtype=None, device=None) -> None:  # noqa: ANN001
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.tp, self.sequence_parallel = tp, sequence_parallel

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = copy_to_parallel(self.weight, self.tp.group) if self.sequence_parallel else self.weight
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * weight


class Attention(nn.Module):
    """Causal self-attention with this rank's heads. ``x [b, s(/W), dim] -> [b, s(/W), dim]``."""

    def __init__(self, cfg: LlamaConfig, group: GroupLike, sequence_parallel: bool, dtype=None, device=None) -> None:  # noqa: ANN001
        super().__init__()
        kw = {"group": group, "sequence_parallel": sequence_parallel, "dtype": dtype, "device": device}
        hd, qkv = cfg.head_dim, {"bias": cfg.qkv_bias, "gather_output": False, **kw}
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, **qkv)
        self.wk = ColumnParallelLinear(cfg.dim, cfg.kv_heads * hd, **qkv)
        self.wv = ColumnParallelLinear(cfg.dim, cfg.kv_heads * hd, **qkv)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, bias=False, input_is_parallel=True, **kw)
        self.tp = self.wq.tp
        self.sequence_parallel = sequence_parallel
        self.head_dim = hd
        self.n_local_heads = cfg.n_heads // self.tp.size
        self.n_local_kv_heads = cfg.kv_heads // self.tp.size

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None, start_pos: int = 0) -> Tensor:
        """``cos, sin [s, head_dim / 2]`` are the rotary tables of the positions of ``x``.

        With ``kv`` the keys and values of ``x`` are stored at ``[start_pos, start_pos + s)`` and
        the queries attend to every cached position up to their own.
        """
        group = self.tp.group
        # One region for q, k and v: a single all-reduce (reduce-scatter with SP) of the input gradient.
        # The gathered input is strided (sequence gathered along dim 1): laid out once here, or each
        # of the three GEMMs would copy it and keep its own copy for backward.
        x = gather_from_sequence(x, group).contiguous() if self.sequence_parallel else copy_to_parallel(x, group)
        b, s, _ = x.shape
        q = F.linear(x, self.wq.weight, self.wq.bias).view(b, s, self.n_local_heads, self.head_dim)
        k = F.linear(x, self.wk.weight, self.wk.bias).view(b, s, self.n_local_kv_heads, self.head_dim)
        v = F.linear(x, self.wv.weight, self.wv.bias).view(b, s, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, head_dim]
        if kv is not None:
            o = _attend_cached(q, *kv.update(start_pos, k, v), start_pos)
            return self.wo.forward_parallel(o.transpose(1, 2).reshape(b, s, -1))
        if self.n_local_kv_heads != self.n_local_heads:
            rep = self.n_local_heads // self.n_local_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo.forward_parallel(o.transpose(1, 2).reshape(b, s, -1))


def _attend_cached(q: Tensor, k: Tensor, v: Tensor, start_pos: int) -> Tensor:
    """Causal attention of ``q [b, heads, s, hd]`` to ``k, v [b, kv_heads, start_pos + s, hd]``.

    Query ``i`` sits at position ``start_pos + i`` and sees keys ``[0, start_pos + i]``. Query head
    ``h`` reads kv head ``h // (heads / kv_heads)``, as ``repeat_interleave`` would, but by grouping
    the queries of each kv head instead of copying the cache. SDPA's ``is_causal`` aligns the mask
    to the top left, wrong once keys outnumber queries, so the mask is spelled out.
    """
    b, heads, s, hd = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = q.reshape(b, kv_heads, group * s, hd)  # rows: (head in group, position)
    mask = None
    if s > 1:  # one new position sees every cached one
        pos = torch.arange(start_pos, total, device=q.device)
        mask = (torch.arange(total, device=q.device) <= pos[:, None]).repeat(group, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.reshape(b, heads, s, hd)


class TransformerBlock(nn.Module):
    def __init__(
        self,
        cfg: LlamaConfig,
        group: GroupLike,
        sequence_parallel: bool,
        dtype=None,  # noqa: ANN001
        device=None,  # noqa: ANN001
        ffn_modes: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        tp = resolve_group(group)
        self.attention = Attention(cfg, group, sequence_parallel, dtype, device)
        self.feed_forward: ParallelFeedForward | ParallelMoEFeedForward
        if cfg.moe is not None:
            self.feed_forward = ParallelMoEFeedForward(
                cfg.dim, cfg.moe, group=group, sequence_parallel=sequence_parallel, dtype=dtype, device=device
            )
        else:
            self.feed_forward = ParallelFeedForward(
                cfg.dim, cfg.hidden_dim, group=group, sequence_parallel=sequence_parallel, dtype=dtype, device=device,
                **(ffn_modes or {}),
            )  # fmt: skip
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp, sequence_parallel, dtype, device)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp, sequence_parallel, dtype, device)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None, start_pos: int = 0
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x [b, s(/W), dim]`` -> the block's output; an MoE block also returns its router logits
        ``[b s, E]`` (of the whole gathered sequence under sequence parallelism), for the auxiliary loss."""
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, start_pos)
        if isinstance(self.feed_forward, ParallelMoEFeedForward):
            y, router_logits = self.feed_forward(self.ffn_norm(h), return_router_logits=True)
            return h + y, router_logits
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama decoder on a TP group. ``tokens [b, s] (int64) -> logits [b, s, vocab]`` on every TP rank.

    ``model(tokens, start_pos=p, cache=model.new_cache(b))`` runs positions ``[p, p + s)`` against
    the cached keys and values of ``[0, p)`` (generation; not with ``sequence_parallel``).
    :meth:`from_pretrained` builds one from a Hugging Face or Meta directory, this rank's slices only.

    Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.N.attention.wq``, ...,
    ``layers.N.feed_forward.w1``, ``norm``, ``output``); each TP-sharded weight holds this rank's
    block. After the same seed every rank builds the same full weights at any TP size.
    ``fuse_gate_up``, ``overlap_comm`` and ``comm_chunks`` pick every feed-forward block's
    execution mode (see :class:`~tp_ffn.ParallelFeedForward`); they change no parameter.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        fuse_gate_up: bool = False,
        overlap_comm: bool = True,
        comm_chunks: int = 1,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = resolve_group(group)
        cfg.check_tp(self.tp.size)
        self.sequence_parallel = bool(sequence_parallel) and self.tp.size > 1
        kw = {"dtype": dtype, "device": device}
        # The feed-forward blocks' execution modes (ParallelFeedForward validates them); the
        # parameters and checkpoints are the same in every mode.
        ffn_modes = {"fuse_gate_up": fuse_gate_up, "overlap_comm": overlap_comm, "comm_chunks": comm_chunks}
        if cfg.moe is not None and (fuse_gate_up or comm_chunks != 1):
            raise ValueError(
                f"fuse_gate_up={fuse_gate_up}, comm_chunks={comm_chunks}: the dense feed-forward block's modes; "
                f"this model's feed-forward blocks are mixtures of experts (n_experts={cfg.n_experts}), which have none"
            )
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, **kw)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, group, self.sequence_parallel, **kw, ffn_modes=ffn_modes) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.tp, self.sequence_parallel, **kw)
        self.output = ColumnParallelLinear(
            cfg.dim,
            cfg.vocab_size,
            bias=False,
            gather_output=True,
            group=group,
            sequence_parallel=self.sequence_parallel,
            **kw,
        )
        # Not in the state dict (derived from the config); to_empty() wipes them: see init_buffers.
        rope_device = None if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("rope_cos", torch.empty(0, device=rope_device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, device=rope_device), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the rotary tables ``rope_cos, rope_sin [max_seq_len, head_dim / 2]`` (float32) on
        their current device; on ``meta`` they stay empty placeholders of the right shape."""
        cos, sin = precompute_rope(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)

    def reset_parameters(self) -> None:
        """What this module itself holds: the rotary tables (:meth:`init_buffers`); it has no
        parameters of its own, and draws no random numbers.

        PyTorch's meta-device recipe (build under ``device="meta"``, ``to_empty(device=...)``, then
        ``reset_parameters()`` on every module that has one, in ``modules()`` order, after the same
        seed) then gives the model a direct build gives, bit for bit.
        """
        self.init_buffers()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        group: GroupLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Transformer:
        """The same as :func:`load_pretrained`."""
        return load_pretrained(path, group=group, device=device, dtype=dtype)

    def rope(self, start_pos: int, length: int) -> tuple[Tensor, Tensor]:
        """The rotary tables ``cos, sin [length, head_dim / 2]`` of positions ``[start_pos, start_pos + length)``."""
        end = start_pos + length
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` (default: max_seq_len) positions."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, int) and max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len: expected at most max_seq_len={self.cfg.max_seq_len}, got {max_len}")
        return KVCache(len(self.layers), batch, max_len)

    def forward(
        self, tokens: Tensor, *, start_pos: int = 0, cache: KVCache | None = None, return_aux_loss: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``tokens [b, s]`` at positions ``[start_pos, start_pos + s)`` -> ``logits [b, s, vocab]``.

        Without ``cache`` the tokens attend causally among themselves (the positions only turn the
        rotary tables). With ``cache`` their keys and values are stored at their positions and they
        attend to every cached position before them as well. ``return_aux_loss``: ``(logits, aux)``,
        ``aux`` the load-balancing loss of every MoE layer's router logits together
        (:func:`~tp_ffn.load_balancing_loss`, transformers' definition, not yet multiplied by
        ``cfg.router_aux_loss_coef``; the same on every TP rank); a dense model's is 0.
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens: expected an integer tensor [batch, seq], got {tokens.dtype} of shape {tuple(tokens.shape)}"
            )
        b, s = tokens.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
        if start_pos + s > self.cfg.max_seq_len:
            raise ValueError(
                f"tokens: expected positions below max_seq_len={self.cfg.max_seq_len}, got [{start_pos}, {start_pos + s})"
            )
        if self.sequence_parallel and s % self.tp.size:
            raise ValueError(
                f"tokens: sequence parallelism needs the sequence length to be divisible by the tensor-parallel "
                f"size {self.tp.size}, got {s}"
            )
        if cache is not None:
            self._check_cache(cache, b, start_pos + s)
        h = self.tok_embeddings(tokens)
        if self.sequence_parallel:
            h = split_sequence(h, self.tp.group)
        cos, sin = self.rope(start_pos, s)
        router_logits = []
        for i, layer in enumerate(self.layers):
            # Training calls the blocks exactly as before (activation checkpointing, compile, FSDP2 wrap them).
            h = layer(h, cos, sin) if cache is None else layer(h, cos, sin, cache.layers[i], start_pos)
            if isinstance(h, tuple):  # an MoE block: its router logits travel out as an output (not a side
                h, logits = h  # effect, which activation checkpointing's recomputation would repeat)
                router_logits.append(logits)
        logits = self.output(self.norm(h))
        if not return_aux_loss:
            return logits
        moe = self.cfg.moe
        if moe is None:
            return logits, logits.new_zeros((), dtype=torch.float32)
        return logits, load_balancing_loss(router_logits, moe.num_experts, moe.top_k)

    def _check_cache(self, cache: KVCache, batch: int, end: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (model.new_cache(batch)), got {type(cache).__name__}")
        if self.sequence_parallel:
            raise ValueError(
                "cache: generation with a KV cache needs a model built without sequence_parallel "
                "(it splits the sequence over ranks; a step has one position)"
            )
        if len(cache) != len(self.layers) or cache.batch != batch or end > cache.max_len:
            raise ValueError(
                f"cache: holds {len(cache)} layers x batch {cache.batch} x {cache.max_len} positions; this call needs "
                f"{len(self.layers)} layers x batch {batch} x {end} positions"
            )


def load_pretrained(
    path: str | os.PathLike,
    *,
    group: GroupLike = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A :class:`Transformer` with the weights of a Hugging Face or Meta checkpoint directory, in one call
    (also ``Transformer.from_pretrained``; to load into a model already built, :func:`~tp_ffn.models.load_weights`).

    The config comes from the directory (``config.json`` or ``params.json``, see
    :func:`~tp_ffn.models.config_from_pretrained`); ``group`` is the TP group (``None``: the default
    group, or a world of one without ``torch.distributed``). The model is built on the ``meta``
    device and each rank reads only its own slices of the sharded weights into parameters on
    ``device`` (default CPU), so no rank ever holds the full model. ``dtype`` is the parameters'
    dtype (default: torch's default dtype, as Hugging Face's ``from_pretrained``); the checkpoint's
    tensors are cast to it. Returned in eval mode. Not a collective. Raises ``ValueError`` naming
    the file and the problem for a directory it cannot load.
    """
    cfg = config_from_pretrained(path)
    model = Transformer(cfg, group=group, dtype=dtype, device="meta")
    load_weights(model, path, device=device)
    return model.eval()
