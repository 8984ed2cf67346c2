"""Low-rank updates (LoRA) of the block's projections, held in the block's own sharding.

A projection ``W`` with low-rank terms computes ``W x + sum_i scale_i * B_i (A_i dropout_i(x))``. In
:class:`~tp_ffn.ParallelFeedForward` each factor is split the way its projection is (PEFT's and Megatron's
layout for tensor-parallel LoRA), so that every product stays on its rank::

    w1, w3 (column-parallel, W [n_r, dim]):   A [r, dim] whole        B [n_r, r] rows [start_r, end_r)
    w2     (row-parallel,    W [dim, n_r]):   A [r, n_r] columns [start_r, end_r)     B [dim, r] whole

w1's and w3's terms add to this rank's columns of ``g`` and ``u``; w2's ``B (A_r h_r)`` is a partial sum that
joins the partial product before the block's one all-reduce. The whole factors (A of w1/w3, B of w2) see only
this rank's share of the work, so their gradients are partial sums: the block sums them over the group with the
input gradient, in the same all-reduce (per dtype, see :func:`~tp_ffn.comm.copy_all_to_parallel`).

A module in a projection slot of the block may be a wrapper (PEFT's LoRA layers, :mod:`tp_ffn.peft`) that holds
the parallel layer as ``base_layer`` and says which terms apply now with ``low_rank_terms()``; the block reads
the weights of :func:`parallel_layer` and applies the terms itself (it never calls the projections' forward).

Dropout draws from the default generator exactly what the dense block draws, in the same order: the mask of
the whole input ``x`` (the same on every rank), and for w2's input ``h`` the full ``[*, hidden]`` mask, of which
each rank keeps its columns. The generator's state after the block is then the dense block's on every rank
(a tensor-parallel group whose generators agree stays in agreement, which replicated layers with dropout rely
on) and results equal the dense model's for the same seed, at the price of drawing ``hidden`` numbers per
token where ``n_r`` would do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ColumnParallelLinear, RowParallelLinear
from .sharding import ShardSpec
from .swiglu import swiglu_linear

__all__ = ["LowRank", "column_term", "low_rank_terms", "parallel_layer", "row_term"]

ParallelLinear = ColumnParallelLinear | RowParallelLinear


@dataclass(frozen=True)
class LowRank:
    """One term ``scale * B (A dropout(x))`` in the sharding of its projection (see the module docstring).

    ``dropout`` is the probability applied now (0 in eval mode). The term runs in ``a``'s dtype: its input is
    cast to it (as PEFT does) and the sum is cast back to the projection's.
    """

    a: Tensor
    b: Tensor
    scale: float
    dropout: float = 0.0


def parallel_layer(module: nn.Module) -> ParallelLinear:
    """The parallel layer in a projection slot: the module itself, or what a wrapper holds as ``base_layer``."""
    layer = module
    while not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
        inner = getattr(layer, "base_layer", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(
                f"expected a ColumnParallelLinear / RowParallelLinear or a wrapper holding one as base_layer, "
                f"got {type(module).__name__}"
            )
        layer = inner
    return layer


def low_rank_terms(module: nn.Module) -> tuple[LowRank, ...]:
    """The terms a projection slot applies now: ``module.low_rank_terms()`` where it has one, else none."""
    terms = getattr(module, "low_rank_terms", None)
    return () if terms is None else tuple(terms())


def column_term(x: Tensor, t: LowRank) -> Tensor:
    """``scale * B_r (A dropout(x))`` for a column-parallel projection: ``x [*, dim]`` whole,
    ``A [r, dim]``, ``B_r [n_r, r]`` -> ``[*, n_r]``."""
    x = x.to(t.a.dtype)
    if t.dropout:
        x = F.dropout(x, t.dropout, training=True)
    return F.linear(F.linear(x, t.a), t.b) * t.scale


def row_term(g: Tensor, u: Tensor, t: LowRank, activation: str, layer: RowParallelLinear) -> Tensor:
    """``scale * B (A_r dropout(h_r))`` with ``h_r = act(g) * u``, this rank's partial sum: ``g, u [*, n_r]``,
    ``A_r [r, n_r]``, ``B [dim, r]`` -> ``[*, dim]``.

    ``h_r`` is never kept: ``act(g) * (u * mask) A_r^T`` is :func:`~tp_ffn.swiglu.swiglu_linear`, which saves
    ``g`` and ``u`` (the block's own, with no dropout) and recomputes ``h_r`` in backward.
    """
    g, u = g.to(t.a.dtype), u.to(t.a.dtype)
    if t.dropout:
        # The dense draw over all hidden columns (see the module docstring); this rank keeps its own.
        ones = torch.ones((*u.shape[:-1], layer.in_features), dtype=u.dtype, device=u.device)
        w = layer.shard_spec("weight")
        keep = ShardSpec.split(ones.shape, ones.dim() - 1, w.rank, w.world, w.parts)
        u = u * keep.take(F.dropout(ones, t.dropout, training=True))
    return F.linear(swiglu_linear(g, u, t.a, activation), t.b) * t.scale
