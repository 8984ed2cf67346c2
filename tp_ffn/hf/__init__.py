"""Hugging Face transformers adapter: tensor-parallel MLPs under their own names, normal checkpoints.

    parallelize_mlp(model, group)        every supported MLP -> its tensor-parallel block, in place
    full_state_dict(model)               the full HF-named tensors on every rank (for save_pretrained)
    from_pretrained(cls, path, group)    build on meta, read only this rank's slices of the MLPs
    clip_grad_norm_(model, max_norm)     clip by the dense model's gradient norm, the same on every rank
    prepare_trainer(trainer)             a transformers.Trainer trains the parallel model as the dense one

This package imports tp_ffn's core (and its safetensors reader, tp_ffn.safetensors_dir); the core never
imports it. transformers, safetensors and accelerate are needed only by from_pretrained and prepare_trainer
(the ``hf`` extra). Which slice of a tensor each rank reads or gathers is what the layer holding it says
(``layer.shard_spec(name)``, tp_ffn.sharding), never worked out here.

    mlp.py      ParallelMLP, the activation names, the layouts (LAYOUTS), parallelize_mlp, full_state_dict
    moe.py      ParallelSparseMoeBlock: Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE blocks on ParallelMoEFeedForward,
                registered as a layout
    phi3.py     Phi-3's fused gate_up_proj (Phi3ParallelMLP), registered as a layout
    guard.py    a block refuses DistributedDataParallel over its own tensor-parallel group
    clip.py     clip_grad_norm_ (on tp_ffn.grad_norm)
    trainer.py  prepare_trainer
    loading.py  from_pretrained
"""

from .clip import clip_grad_norm_
from .loading import from_pretrained
from .mlp import HF_ACTIVATIONS, LAYOUTS, ParallelMLP, full_state_dict, parallelize_mlp
from .moe import ParallelSparseMoeBlock  # registers the MoE layout (after ParallelMLP's, before Phi-3's)
from .phi3 import Phi3ParallelMLP  # registers the Phi-3 layout
from .trainer import prepare_trainer

__all__ = [
    "HF_ACTIVATIONS",
    "LAYOUTS",
    "ParallelMLP",
    "ParallelSparseMoeBlock",
    "Phi3ParallelMLP",
    "clip_grad_norm_",
    "from_pretrained",
    "full_state_dict",
    "parallelize_mlp",
    "prepare_trainer",
]
