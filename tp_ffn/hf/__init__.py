"""Hugging Face transformers adapter: tensor-parallel MLPs under their own names, normal checkpoints.

    parallelize_mlp(model, group)        every supported MLP -> its tensor-parallel block, in place
    full_state_dict(model)               the full HF-named tensors on every rank (for save_pretrained)
    from_pretrained(cls, path, group)    build on meta, read only this rank's slices of the MLPs
    clip_grad_norm_(model, max_norm)     clip by the dense model's gradient norm, the same on every rank
    prepare_trainer(trainer)             a transformers.Trainer trains the parallel model as the dense one

This package imports tp_ffn's core; the core never imports it. transformers, safetensors and accelerate
are needed only by from_pretrained and prepare_trainer (the ``hf`` extra).

    mlp.py      ParallelMLP, the activation names, the layouts, parallelize_mlp, full_state_dict
    phi3.py     Phi-3's fused gate_up_proj (Phi3ParallelMLP), registered as a layout
    guard.py    a block refuses DistributedDataParallel over its own tensor-parallel group
    clip.py     clip_grad_norm_ (on tp_ffn.grad_norm)
    trainer.py  prepare_trainer
    files.py    safetensors checkpoint directories, read a chunk of rows at a time
    loading.py  from_pretrained
"""

from .clip import clip_grad_norm_
from .loading import from_pretrained
from .mlp import HF_ACTIVATIONS, LAYOUTS, ParallelMLP, full_state_dict, parallelize_mlp
from .phi3 import Phi3ParallelMLP
from .trainer import prepare_trainer

__all__ = [
    "HF_ACTIVATIONS",
    "LAYOUTS",
    "ParallelMLP",
    "Phi3ParallelMLP",
    "clip_grad_norm_",
    "from_pretrained",
    "full_state_dict",
    "parallelize_mlp",
    "prepare_trainer",
]
