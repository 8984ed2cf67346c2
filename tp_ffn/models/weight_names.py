"""Names in the two on-disk layouts of Llama weights: files, tensors, and HF's rotary row order.

See :mod:`tp_ffn.models.weights` for the table of every tensor in both namings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from .llama import LlamaConfig

__all__ = [
    "HF_CONFIG", "HF_FLOAT_DTYPES", "HF_IGNORED_SUFFIX", "HF_INDEX", "HF_SINGLE", "META_EMBEDDING_SPLITS",
    "META_IGNORED", "META_PARAMS", "META_SHARD", "WeightEntry", "hf_to_meta_rows", "meta_to_hf_rows", "weight_layout",
]  # fmt: skip

HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
META_PARAMS = "params.json"
META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# Precomputed rotary tables some checkpoints carry; the model computes its own.
META_IGNORED = {"rope.freqs"}
HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"
HF_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# Meta's split of tok_embeddings.weight [vocab, dim]: Llama 3 / llama-models shard the vocabulary
# (fairscale's VocabParallelEmbedding), Llama 1 / 2 the embedding dimension (ParallelEmbedding).
META_EMBEDDING_SPLITS = {"vocab": 0, "dim": 1}


@dataclass(frozen=True)
class WeightEntry:
    """One weight: its names, full shape, Meta's split dim, and the heads HF permutes (q, k) or None."""

    name: str
    hf: str
    shape: tuple[int, ...]
    meta_dim: int | None
    heads: int | None = None


def weight_layout(cfg: LlamaConfig) -> list[WeightEntry]:
    """Every weight of ``Transformer(cfg)``, in the model's parameter order."""
    d, h, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = [WeightEntry("tok_embeddings.weight", "model.embed_tokens.weight", (v, d), META_EMBEDDING_SPLITS["vocab"])]
    for i in range(cfg.n_layers):
        m, f = f"layers.{i}.", f"model.layers.{i}."
        out += [
            WeightEntry(m + "attention.wq.weight", f + "self_attn.q_proj.weight", (q, d), 0, cfg.n_heads),
            WeightEntry(m + "attention.wk.weight", f + "self_attn.k_proj.weight", (kv, d), 0, cfg.kv_heads),
            WeightEntry(m + "attention.wv.weight", f + "self_attn.v_proj.weight", (kv, d), 0),
            WeightEntry(m + "attention.wo.weight", f + "self_attn.o_proj.weight", (d, q), 1),
            WeightEntry(m + "feed_forward.w1.weight", f + "mlp.gate_proj.weight", (h, d), 0),
            WeightEntry(m + "feed_forward.w2.weight", f + "mlp.down_proj.weight", (d, h), 1),
            WeightEntry(m + "feed_forward.w3.weight", f + "mlp.up_proj.weight", (h, d), 0),
            WeightEntry(m + "attention_norm.weight", f + "input_layernorm.weight", (d,), None),
            WeightEntry(m + "ffn_norm.weight", f + "post_attention_layernorm.weight", (d,), None),
        ]
    out += [
        WeightEntry("norm.weight", "model.norm.weight", (d,), None),
        WeightEntry("output.weight", "lm_head.weight", (v, d), 0),
    ]
    return out


def hf_to_meta_rows(w: Tensor, head_dim: int) -> Tensor:
    """Undo HF's rotary permutation on whole heads of rows ``[heads * head_dim, *]``."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: Tensor, head_dim: int) -> Tensor:
    return w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
