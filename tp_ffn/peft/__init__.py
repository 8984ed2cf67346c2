"""PEFT adapter: LoRA on tp_ffn's tensor-parallel blocks, through PEFT itself (``peft>=0.21``, the ``peft`` extra).

Importing it teaches PEFT (once) to put its LoRA layers on the projections of every
:class:`~tp_ffn.ParallelFeedForward` (so on the MLPs of :func:`tp_ffn.hf.parallelize_mlp`, which imports it
where PEFT is installed)::

    tp_ffn.hf.parallelize_mlp(model, group)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    ...                                                     # or target_modules="all-linear"
    sd = tp_ffn.hf.full_state_dict(model)                   # every rank: the dense adapter's tensors
    if rank == 0:
        model.save_pretrained(path, state_dict=sd)          # PEFT's files, for the unparallelized model
    peft.PeftModel.from_pretrained(parallel_model, path)    # a dense adapter: each rank takes its slices

The layers are exact against PEFT's dense LoRA (draws included) and keep the block's one forward all-reduce;
see :mod:`tp_ffn.lowrank` for the sharding and :mod:`tp_ffn.peft.lora` for what PEFT is taught.

This package imports tp_ffn's core and PEFT; the core never imports it.
"""

from __future__ import annotations

try:  # peft 0.21 reads torch.distributed.tensor.DTensor in every get_peft_model without importing it (torch 2.13)
    import torch.distributed.tensor  # noqa: F401
except ImportError:  # pragma: no cover - torch < 2.5 has no public DTensor, and peft does not look for it there
    pass

from .lora import LoraColumnParallelLinear, LoraRowParallelLinear, install

install()

__all__ = ["LoraColumnParallelLinear", "LoraRowParallelLinear", "install"]
