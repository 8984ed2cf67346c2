"""Names in the two on-disk layouts of Llama weights: files, tensors, and HF's rotary row order.

The one HF <-> Meta names table of the Llama model: :data:`LAYER_NAMES` (per layer) and
:data:`MODEL_NAMES` (outside the layers); the feed-forward projections come from the core's
:data:`tp_ffn.checkpoint.META_TO_HF` (``w1`` = ``gate_proj`` ...), which the block itself reads.
See :mod:`tp_ffn.models.weights` for the table of every tensor in both namings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ..checkpoint import META_TO_HF
from ..moe import moe_shapes
from ..safetensors_dir import FLOAT_DTYPES, INDEX, SINGLE
from .config import LlamaConfig

__all__ = [
    "HF_CONFIG",
    "HF_FLOAT_DTYPES",
    "HF_IGNORED_SUFFIX",
    "HF_INDEX",
    "HF_SINGLE",
    "LAYER_NAMES",
    "META_EMBEDDING_SPLITS",
    "META_IGNORED",
    "META_PARAMS",
    "META_SHARD",
    "MODEL_NAMES",
    "MOE_NAMES",
    "WeightEntry",
    "hf_decoder_fields",
    "hf_moe_family",
    "hf_to_meta_rows",
    "meta_to_hf_rows",
    "weight_layout",
]  # fmt: skip

HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", SINGLE, INDEX
META_PARAMS = "params.json"
META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# Precomputed rotary tables some checkpoints carry; the model computes its own.
META_IGNORED = {"rope.freqs"}
HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"
HF_FLOAT_DTYPES = set(FLOAT_DTYPES)
# Meta's split of tok_embeddings.weight [vocab, dim]: Llama 3 / llama-models shard the vocabulary
# (fairscale's VocabParallelEmbedding), Llama 1 / 2 the embedding dimension (ParallelEmbedding).
META_EMBEDDING_SPLITS = {"vocab": 0, "dim": 1}


# Meta name -> Hugging Face name below ``layers.N.`` / ``model.layers.N.``, in the model's parameter order.
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    **{f"feed_forward.{w}.weight": f"mlp.{META_TO_HF[w]}.weight" for w in ("w1", "w2", "w3")},
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# A mixture-of-experts block's weights (below ``layers.N.feed_forward.``), by Hugging Face family: the
# block's name in the checkpoint, then ours -> theirs below it; ``{e}``: one stored tensor per expert
# (transformers 4's layout, which transformers 5 also writes to disk). Qwen2-MoE's names serve every
# config Mixtral cannot hold (a shared expert, no renormalisation).
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", {
        "router.weight": "gate.weight",
        **{f"experts.{w}": f"experts.{{e}}.{w}.weight" for w in ("w1", "w2", "w3")},
    }),
    "qwen2_moe": ("mlp", {
        "router.weight": "gate.weight",
        **{f"experts.{w}": f"experts.{{e}}.{META_TO_HF[w]}.weight" for w in ("w1", "w2", "w3")},
        **{f"shared_expert.{w}.weight": f"shared_expert.{META_TO_HF[w]}.weight" for w in ("w1", "w2", "w3")},
        "shared_expert_gate.weight": "shared_expert_gate.weight",
    }),
}  # fmt: skip
# Outside the layers: Meta name -> Hugging Face name.
MODEL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}  # fmt: skip


def hf_decoder_fields(cfg: LlamaConfig) -> dict[str, int | float | str]:
    """The ``config.json`` fields every family written here (Llama, Mixtral, Qwen2-MoE) spells alike."""
    return {
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
    }


@dataclass(frozen=True)
class WeightEntry:
    """One weight: its names, full shape, Meta's split dim, and the heads HF permutes (q, k) or None.

    ``experts > 0``: stacked experts ``[E, ...]``, stored by Hugging Face as one tensor per expert,
    ``hf.format(e=k)`` holding ``[k]`` (see :meth:`hf_tensors`).
    """

    name: str
    hf: str
    shape: tuple[int, ...]
    meta_dim: int | None
    heads: int | None = None
    experts: int = 0

    def hf_tensors(self) -> dict[str, tuple[int, ...]]:
        """The stored Hugging Face tensors of this weight and their shapes."""
        if not self.experts:
            return {self.hf: self.shape}
        return {self.hf.format(e=k): self.shape[1:] for k in range(self.experts)}


def hf_moe_family(cfg: LlamaConfig) -> str:
    """The Hugging Face family whose names an MoE config's weights take (:data:`MOE_NAMES`): Mixtral for
    softmax routing renormalised without a shared expert, else Qwen2-MoE's names."""
    moe = cfg.moe
    mixtral = moe is not None and moe.routing == "softmax" and moe.norm_topk_prob and not moe.shared_hidden_dim
    return "mixtral" if mixtral else "qwen2_moe"


def _moe_entries(cfg: LlamaConfig, i: int) -> list[WeightEntry]:
    """Layer ``i``'s feed-forward weights of an MoE config, in the block's parameter order."""
    moe = cfg.moe
    assert moe is not None
    block, names = MOE_NAMES[hf_moe_family(cfg)]
    out = []
    for key, shape in moe_shapes(cfg.dim, moe).items():
        # No Meta split dim: Meta's checkpoint format has no experts (export_meta refuses MoE models).
        out.append(WeightEntry(
            f"layers.{i}.feed_forward.{key}", f"model.layers.{i}.{block}.{names[key]}", shape, None,
            experts=moe.num_experts if key.startswith("experts.") else 0,
        ))  # fmt: skip
    return out


def _layer_names(cfg: LlamaConfig) -> dict[str, str]:
    """:data:`LAYER_NAMES`, with the q / k / v biases after their weights when the config has them."""
    if not cfg.qkv_bias:
        return LAYER_NAMES
    out = {}
    for m, hf in LAYER_NAMES.items():
        out[m] = hf
        if m in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"):
            out[m.replace(".weight", ".bias")] = hf.replace(".weight", ".bias")
    return out


def weight_layout(cfg: LlamaConfig) -> list[WeightEntry]:
    """Every weight of ``Transformer(cfg)``, in the model's parameter order."""
    d, h, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    # Meta name -> (full shape, Meta's split dim, the heads HF permutes).
    layer = {
        "attention.wq.weight": ((q, d), 0, cfg.n_heads),
        "attention.wk.weight": ((kv, d), 0, cfg.kv_heads),
        "attention.wv.weight": ((kv, d), 0, None),
        "attention.wo.weight": ((d, q), 1, None),
        "feed_forward.w1.weight": ((h, d), 0, None),
        "feed_forward.w2.weight": ((d, h), 1, None),
        "feed_forward.w3.weight": ((h, d), 0, None),
        "attention_norm.weight": ((d,), None, None),
        "ffn_norm.weight": ((d,), None, None),
    }
    model = {
        "tok_embeddings.weight": ((v, d), META_EMBEDDING_SPLITS["vocab"], None),
        "norm.weight": ((d,), None, None),
        "output.weight": ((v, d), 0, None),
    }
    if cfg.qkv_bias:  # HF permutes the q / k bias rows as their weight rows
        layer.update({"attention.wq.bias": ((q,), 0, cfg.n_heads), "attention.wk.bias": ((kv,), 0, cfg.kv_heads),
                      "attention.wv.bias": ((kv,), 0, None)})  # fmt: skip
    out = [WeightEntry("tok_embeddings.weight", MODEL_NAMES["tok_embeddings.weight"], *model["tok_embeddings.weight"])]
    for i in range(cfg.n_layers):
        for m, hf in _layer_names(cfg).items():
            if cfg.moe is not None and m.startswith("feed_forward."):
                if m == "feed_forward.w1.weight":
                    out += _moe_entries(cfg, i)
                continue
            out.append(WeightEntry(f"layers.{i}.{m}", f"model.layers.{i}.{hf}", *layer[m]))
    out += [WeightEntry(m, MODEL_NAMES[m], *model[m]) for m in ("norm.weight", "output.weight")]
    return out


def hf_to_meta_rows(w: Tensor, head_dim: int) -> Tensor:
    """Undo HF's rotary permutation on whole heads of rows ``[heads * head_dim, *]``."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: Tensor, head_dim: int) -> Tensor:
    return w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
