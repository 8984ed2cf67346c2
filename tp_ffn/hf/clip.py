"""Gradient clipping by the norm of the dense model, for a model parallelized by :mod:`tp_ffn.hf`."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..grad_norm import clip_grad_norm_ as _clip_sharded
from ..sharding import shard_spec_of

__all__ = ["clip_grad_norm_", "sharded_over"]


def sharded_over(model: nn.Module) -> dict[int, ProcessGroup]:
    """``{id(parameter): group}`` for the parameters of ``model`` sharded over a tensor-parallel group."""
    out: dict[int, ProcessGroup] = {}
    for module in model.modules():
        factors = getattr(module, "sharded_factors", None)
        if callable(factors):  # a LoRA layer of tp_ffn.peft: its factors' holders are PEFT's plain nn.Linear
            out.update((id(p), group) for p, spec, group in factors() if spec.is_sharded and spec.world > 1)
        for name, param in module.named_parameters(recurse=False):
            # What the layer holding it says (tp_ffn.sharding): MLP and expert weights, LoRA factors; a
            # row-parallel bias is whole.
            if shard_spec_of(module, name, param).is_sharded and module.tp.size > 1:
                out[id(param)] = module.tp.group
    return out


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_(dense_model.parameters(), ...)`` for a tensor-parallel ``model``.

    The total norm is that of the dense model's gradient: each sharded gradient (the MLP weights) counts once
    over its group, each replicated one (embeddings, norms, attention, a row-parallel bias) once. It is the
    same on every rank, so every rank scales by the same ``min(1, max_norm / (total + 1e-6))``. ``norm_type``
    (``inf`` included), ``error_if_nonfinite`` and ``foreach`` as in torch. Returns the total norm before
    clipping. Collective over every tensor-parallel group of the model; with data parallelism as well, call it
    after the gradients are averaged (they are then the same on every data-parallel rank).
    """
    params = list(model.parameters())
    groups = sharded_over(model)
    return _clip_sharded(
        params, max_norm, norm_type, sharded_over=[groups.get(id(p)) for p in params],
        error_if_nonfinite=error_if_nonfinite, foreach=foreach,
    )  # fmt: skip
