"""The expert fields of a Hugging Face MoE ``config.json`` (Mixtral) and back.

Mixtral is Llama's decoder with every MLP a mixture of experts, so it is the family this model loads
and writes whole: ``intermediate_size`` is each expert's, ``num_local_experts`` experts,
``num_experts_per_tok`` per token, softmax routing renormalised over the chosen (Mixtral always
renormalises), ``router_aux_loss_coef`` as the aux-loss weight. Refused, naming the field: a
``sliding_window`` (this model attends to the whole context) and ``router_jitter_noise`` > 0 (not
implemented). Qwen2-MoE, Qwen3-MoE and OLMoE put their experts in an attention block this model does
not have (q/k/v biases; q/k norms), so they are refused by ``model_type``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import LlamaConfig
from .weight_names import hf_moe_family

__all__ = ["HF_MOE_TYPES", "hf_moe_config", "moe_fields_from_hf"]

# model_type -> architecture, for the MoE families read and written here.
HF_MOE_TYPES = {"mixtral": "MixtralForCausalLM"}


def _count(data: Mapping[str, Any], key: str, source: Path) -> int:
    v = data.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{source}: {key}: expected a positive int, got {v!r}")
    return v


def moe_fields_from_hf(data: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The :class:`LlamaConfig` expert fields of a Mixtral ``config.json`` (``data``, already read)."""
    if data.get("sliding_window") is not None:
        raise ValueError(f"{source}: sliding_window: not supported (full causal attention only), expected null, "
                         f"got {data['sliding_window']!r}")  # fmt: skip
    jitter = data.get("router_jitter_noise", 0.0)
    if jitter:
        raise ValueError(f"{source}: router_jitter_noise: not supported, expected 0, got {jitter!r}")
    coef = data.get("router_aux_loss_coef", 0.001)  # transformers' MixtralConfig default
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"{source}: router_aux_loss_coef: expected a finite number >= 0, got {coef!r}")
    return {
        "n_experts": _count(data, "num_local_experts", source),
        "n_experts_per_token": _count(data, "num_experts_per_tok", source),
        "expert_hidden_dim": _count(data, "intermediate_size", source),
        "routing": "softmax",
        "norm_topk_prob": True,
        "router_aux_loss_coef": float(coef),
    }


def hf_moe_config(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (an MoE config) as a Mixtral checkpoint; ``ValueError`` for a
    config Mixtral cannot hold (a shared expert, another routing, no renormalisation)."""
    moe = cfg.moe
    if moe is None or hf_moe_family(cfg) != "mixtral":
        raise ValueError(
            "Hugging Face export: only Mixtral's layout is written (softmax routing renormalised, no shared expert), "
            f"got {moe}"
        )
    return {
        "architectures": [HF_MOE_TYPES["mixtral"]],
        "model_type": "mixtral",
        "hidden_size": cfg.dim,
        "intermediate_size": moe.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
