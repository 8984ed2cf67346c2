"""The expert fields of a Hugging Face MoE ``config.json`` (Mixtral, Qwen2-MoE) and back.

Both are Llama's decoder with every MLP a mixture of experts, softmax routing:

- Mixtral: ``intermediate_size`` is each expert's, ``num_local_experts`` experts, ``num_experts_per_tok``
  per token, always renormalised over the chosen. Refused: ``sliding_window`` (this model attends to the
  whole context), ``router_jitter_noise`` > 0 (not implemented).
- Qwen2-MoE: ``num_experts`` of ``moe_intermediate_size``, ``num_experts_per_tok``, ``norm_topk_prob``
  (default false), a shared expert of ``shared_expert_intermediate_size`` with its sigmoid gate, and
  biases on q / k / v (``qkv_bias``). Refused: dense layers among the sparse ones (``mlp_only_layers``,
  ``decoder_sparse_step`` > 1), ``use_sliding_window``. Its dense ``intermediate_size`` is then unused.

``router_aux_loss_coef`` is the aux-loss weight. Qwen3-MoE and OLMoE normalise q and k per head, which
this model's attention does not, so they are refused by ``model_type``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import LlamaConfig
from .weight_names import hf_decoder_fields, hf_moe_family

__all__ = ["HF_MOE_TYPES", "hf_moe_config", "hf_moe_fits", "moe_fields_from_hf", "qwen2_moe_zero_biases"]

# model_type -> architecture, for the MoE families read and written here.
HF_MOE_TYPES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _count(data: Mapping[str, Any], key: str, source: Path) -> int:
    v = data.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{source}: {key}: expected a positive int, got {v!r}")
    return v


def _expect(data: Mapping[str, Any], key: str, default: object, want: object, source: Path, why: str) -> None:
    if data.get(key, default) != want:
        raise ValueError(f"{source}: {key}: not supported ({why}), expected {want!r}, got {data[key]!r}")


def moe_fields_from_hf(data: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The :class:`LlamaConfig` fields of a Mixtral or Qwen2-MoE ``config.json`` (``data``, already read)
    beyond Llama's."""
    coef = data.get("router_aux_loss_coef", 0.001)  # both families' default in transformers
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"{source}: router_aux_loss_coef: expected a finite number >= 0, got {coef!r}")
    common = {"routing": "softmax", "router_aux_loss_coef": float(coef)}
    if data["model_type"] == "mixtral":
        _expect(data, "sliding_window", None, None, source, "full causal attention only")
        _expect(data, "router_jitter_noise", 0.0, 0.0, source, "no router noise")
        return {
            **common,
            "n_experts": _count(data, "num_local_experts", source),
            "n_experts_per_token": _count(data, "num_experts_per_tok", source),
            "expert_hidden_dim": _count(data, "intermediate_size", source),
            "norm_topk_prob": True,
        }
    _expect(data, "use_sliding_window", False, False, source, "full causal attention only")
    _expect(data, "decoder_sparse_step", 1, 1, source, "every layer a mixture of experts")
    _expect(data, "mlp_only_layers", [], [], source, "every layer a mixture of experts")
    norm = data.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"{source}: norm_topk_prob: expected true or false, got {norm!r}")
    return {
        **common,
        "n_experts": _count(data, "num_experts", source),
        "n_experts_per_token": _count(data, "num_experts_per_tok", source),
        "expert_hidden_dim": _count(data, "moe_intermediate_size", source),
        "shared_expert_hidden_dim": _count(data, "shared_expert_intermediate_size", source),
        "shared_expert_gate": True,
        "norm_topk_prob": norm,
        "qkv_bias": True,
    }


def hf_moe_fits(cfg: LlamaConfig) -> bool:
    """Whether the family of :func:`~tp_ffn.models.weight_names.hf_moe_family` holds ``cfg`` whole."""
    moe = cfg.moe
    if moe is None or moe.routing != "softmax":
        return False
    if hf_moe_family(cfg) == "mixtral":
        return not cfg.qkv_bias
    return moe.shared_expert_gate  # Qwen2-MoE: a shared expert and its gate in every layer


def hf_moe_config(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (an MoE config) as a Mixtral or a Qwen2-MoE checkpoint
    (:func:`~tp_ffn.models.weight_names.hf_moe_family`); ``ValueError`` for a config neither holds."""
    moe, family = cfg.moe, hf_moe_family(cfg)
    if moe is None or not hf_moe_fits(cfg):
        raise ValueError(
            "Hugging Face export: no supported family holds this model: Mixtral needs softmax routing renormalised, "
            "no shared expert and no q/k/v biases; Qwen2-MoE softmax routing and a gated shared expert; got "
            f"{moe}, qkv_bias={cfg.qkv_bias}"
        )
    if family == "mixtral":
        specific = {
            "intermediate_size": moe.hidden_dim, "num_local_experts": moe.num_experts, "router_jitter_noise": 0.0,
            "sliding_window": None,
        }  # fmt: skip
    else:  # Qwen2-MoE; its dense intermediate_size is unused (every layer sparse)
        specific = {
            "intermediate_size": moe.hidden_dim, "moe_intermediate_size": moe.hidden_dim,
            "num_experts": moe.num_experts,
            "shared_expert_intermediate_size": moe.shared_hidden_dim, "norm_topk_prob": moe.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
        }  # fmt: skip
    return {
        "architectures": [HF_MOE_TYPES[family]],
        "model_type": family,
        "hidden_size": cfg.dim,
        **specific,
        **hf_decoder_fields(cfg),
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def qwen2_moe_zero_biases(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero q / k / v biases under Qwen2-MoE's names, for a model without ``qkv_bias`` written as Qwen2-MoE
    (whose attention always has them): the same function, and a checkpoint transformers loads whole."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {
        f"model.layers.{i}.self_attn.{name}.bias": torch.zeros(rows, dtype=dtype)
        for i in range(cfg.n_layers)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))
    }
