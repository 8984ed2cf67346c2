"""Gradient norm and clipping of a model whose parameters are partly sharded over process groups.

``torch.nn.utils.clip_grad_norm_`` on a tensor-parallel model sees only this rank's shards: each rank gets
another norm, scales by another factor, and the replicated weights drift apart. Here each parameter says
over which group it is sharded (its pieces on the group's ranks are disjoint parts of one full tensor) or
that it is whole (``None``: replicated, each rank holds the same values and counts it once). Each sharded
parameter's norm is combined over its group (one all-reduce per group for all of them), then the per-tensor
norms are stacked and reduced exactly as torch does, so the result is torch's norm of the full model, the
same on every rank.

    norm_type p (finite, != 0)   full ||g||_p = (sum over ranks ||g_r||_p^p)^(1/p)
    inf / -inf                   max / min over ranks
    0                            sum over ranks (the count of non-zero elements)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = ["clip_grad_norm_", "grad_norm"]


def _combine(norms: list[Tensor | None], p: float, group: ProcessGroup) -> list[Tensor | None]:
    """Each sharded parameter's full norm from this rank's pieces' norms (``None``: no gradient here), with
    one all-reduce; ``None`` where no rank of ``group`` had a gradient."""
    if p == math.inf:
        op, neutral = dist.ReduceOp.MAX, 0.0
    elif p == -math.inf:
        op, neutral = dist.ReduceOp.MIN, math.inf
    else:
        op, neutral = dist.ReduceOp.SUM, 0.0
    powered = p not in (0.0, math.inf, -math.inf)
    device = next((n.device for n in norms if n is not None), torch.device("cpu"))
    f64 = {"dtype": torch.float64, "device": device}
    values = [torch.tensor(neutral, **f64) if n is None else n.to(**f64) ** (p if powered else 1.0) for n in norms]
    # Whether a rank had a gradient, signed so that every op answers "any rank": max(1, 0), min(-1, 0), sum > 0.
    here = torch.tensor([0.0 if n is None else (-1.0 if op == dist.ReduceOp.MIN else 1.0) for n in norms], **f64)
    packed = torch.cat([torch.stack(values), here])
    dist.all_reduce(packed, op=op, group=group)
    full, anywhere = packed[: len(norms)], packed[len(norms) :] != 0
    if powered:
        full = full ** (1.0 / p)
    dtypes = [n.dtype if n is not None else torch.float32 for n in norms]
    return [full[i].to(dtypes[i]) if anywhere[i] else None for i in range(len(norms))]


def _local_norms(grads: list[Tensor | None], p: float, foreach: bool | None) -> list[Tensor | None]:
    """Each gradient's norm (``None`` stays ``None``), computed as torch's clipping computes it: with
    ``torch._foreach_norm`` per device and dtype unless ``foreach`` is ``False``."""
    out: list[Tensor | None] = [None] * len(grads)
    grouped: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None:
            grouped.setdefault((g.device, g.dtype), []).append(i)
    for index in grouped.values():
        tensors = [grads[i] for i in index]
        if foreach is False:
            norms = [torch.linalg.vector_norm(g, p) for g in tensors]
        else:
            norms = torch._foreach_norm(tensors, p)
        for i, n in zip(index, norms):
            out[i] = n
    return out


def grad_norm(
    parameters: Sequence[Tensor],
    sharded_over: Sequence[ProcessGroup | None],
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """The ``norm_type``-norm of the gradients of the full (unsharded) parameters, as
    ``torch.nn.utils.get_total_norm`` gives it on the dense model, the same on every rank.

    ``sharded_over[i]`` is the group ``parameters[i]`` is split over, or ``None`` when it is whole on this
    rank. Every rank of a group must call this with its pieces of the same parameters in the same order
    (collective). Parameters without a gradient are left out, as torch leaves them out. A non-finite norm
    with ``error_if_nonfinite`` is a ``RuntimeError`` (on every rank), as in torch. ``foreach`` as in torch.
    """
    if len(parameters) != len(sharded_over):
        raise ValueError(f"sharded_over: expected one entry per parameter ({len(parameters)}), got {len(sharded_over)}")
    p = float(norm_type)
    local = _local_norms([None if t.grad is None else t.grad.detach() for t in parameters], p, foreach)
    norms: list[Tensor] = []
    by_group: dict[int, tuple[ProcessGroup, list[Tensor | None]]] = {}
    for norm, group in zip(local, sharded_over):
        if group is None or dist.get_world_size(group) == 1:
            if norm is not None:
                norms.append(norm)
        else:
            by_group.setdefault(id(group), (group, []))[1].append(norm)
    for group, pieces in by_group.values():
        norms += [n for n in _combine(pieces, p, group) if n is not None]
    if not norms:
        return torch.tensor(0.0)
    first = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)
    if error_if_nonfinite and not total.isfinite():
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total


def clip_grad_norm_(
    parameters: Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    sharded_over: Sequence[ProcessGroup | None],
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of the full model: scale every gradient by
    ``min(1, max_norm / (total + 1e-6))`` with ``total`` from :func:`grad_norm`, and return ``total``.

    ``foreach`` as in torch: ``False`` computes and scales one tensor at a time, otherwise with the
    ``torch._foreach_*`` kernels per device and dtype (torch raises for devices without them).
    """
    parameters = list(parameters)
    total = grad_norm(parameters, sharded_over, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    grouped: dict[torch.device, list[Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            grouped.setdefault(param.grad.device, []).append(param.grad)
    with torch.no_grad():
        for device, grads in grouped.items():
            scale = coef.to(device)
            if foreach is False:
                for g in grads:
                    g.mul_(scale)
            else:
                torch._foreach_mul_(grads, scale)
    return total
