"""Hugging Face transformers adapter: tensor-parallel MLPs under their own names, normal checkpoints.

    parallelize_mlp(model, group)        every gate_proj/up_proj/down_proj MLP -> ParallelMLP, in place
    full_state_dict(model)               the full HF-named tensors on every rank (for save_pretrained)
    from_pretrained(cls, path, group)    build on meta, read only this rank's slices of the MLPs

This package imports tp_ffn's core (and its safetensors reader, tp_ffn.safetensors_dir); the core never
imports it. transformers, safetensors and accelerate are needed only by from_pretrained (the ``hf`` extra).
Which slice of a tensor each rank reads or gathers is what the layer holding it says
(``layer.shard_spec(name)``, tp_ffn.sharding), never worked out here.

    mlp.py      ParallelMLP, the activation names, parallelize_mlp, full_state_dict
    moe.py      ParallelSparseMoeBlock: Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE blocks on ParallelMoEFeedForward
    loading.py  from_pretrained
"""

from .loading import from_pretrained
from .mlp import HF_ACTIVATIONS, ParallelMLP, full_state_dict, parallelize_mlp
from .moe import ParallelSparseMoeBlock  # also registers the MoE blocks with parallelize_mlp

__all__ = [
    "HF_ACTIVATIONS",
    "ParallelMLP",
    "ParallelSparseMoeBlock",
    "from_pretrained",
    "full_state_dict",
    "parallelize_mlp",
]
