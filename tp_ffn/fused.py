"""GEMMs fused with their communication: the fast paths of :class:`~tp_ffn.ParallelFeedForward`.

``gate_up_projection`` computes both column-parallel projections of the block (w1 and w3) behind
one entry region, optionally as one GEMM on the concatenated shards, and in backward starts the
input-gradient all-reduce (reduce-scatter under sequence parallelism) before computing the
weight gradients, so the collective runs while they compute (Megatron's async input-gradient
all-reduce). ``row_parallel_chunked`` is :func:`~tp_ffn.swiglu.swiglu_linear` (the gated activation
and the down projection, keeping only ``g`` and ``u``) with the tokens split into chunks, each
chunk's all-reduce started while the next chunk's GEMM runs.

The collectives start at once and are waited for where the result is needed. In eager mode they
are c10d calls with ``async_op=True`` that reduce in place into a buffer this module owns; under
``torch.compile`` they are the functional ops (``torch.ops._c10d_functional``), which it traces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm import gather_sequence_blocks, reduce_scatter_sequence_blocks
from .swiglu import act_mul, compute_dtype, swiglu_linear_backward

__all__ = ["gate_up_projection", "row_parallel_chunked"]


_c10d = torch.ops._c10d_functional


# Eager mode all-reduces in place and keeps the c10d Work handle: the functional all-reduce first
# copies its input into a second activation-sized buffer. (Speed: within noise on gloo, see
# benchmarks/bench_parts.py.) Under torch.compile the functional ops stand in, since it traces them.
def _all_reduce_start(x: Tensor, group: ProcessGroup) -> tuple[Tensor, Any]:
    """Start summing ``x`` (a buffer the caller owns: eager mode reduces into it) over ``group``.
    Returns the result-to-be and a handle for :func:`_wait`."""
    if torch.compiler.is_compiling():
        return _c10d.all_reduce(x.contiguous(), "sum", group.group_name), None
    x = x.contiguous()
    return x, dist.all_reduce(x, group=group, async_op=True)


def _reduce_scatter_start(x: Tensor, group: ProcessGroup, dim: int, dtype: torch.dtype) -> tuple[Tensor, Any]:
    """Start the reduce-scatter of ``x`` along ``dim``, summed in ``dtype``; as :func:`_all_reduce_start`
    (``x`` may be the caller's own: it is not written). Eager mode's result comes laid out as ``x``
    (contiguous), the functional op's along dim 0 (see :func:`_wait_input_grad`)."""
    if torch.compiler.is_compiling():
        x = x.to(dtype).movedim(dim, 0).contiguous()
        return _c10d.reduce_scatter_tensor(x, "sum", group.size(), group.group_name), None
    return reduce_scatter_sequence_blocks(x, group, dim, dtype=dtype, async_op=True)


def _wait(pending: tuple[Tensor, Any]) -> Tensor:
    x, work = pending
    if work is None:
        return _c10d.wait_tensor(x)
    work.wait()
    return x


def _wait_input_grad(pending: tuple[Tensor, Any], seq_dim: int | None) -> Tensor:
    """The input gradient once its collective is done; the functional reduce-scatter's shard goes
    back from dim 0 to ``seq_dim``."""
    dx = _wait(pending)
    return dx if seq_dim is None or pending[1] is not None else dx.movedim(0, seq_dim)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class _GateUp(torch.autograd.Function):
    """Forward: (SP: all-gather) then ``g = x w1^T + b1``, ``u = x w3^T + b3``.
    Backward: input-gradient GEMM, then all-reduce (SP: reduce-scatter) started, then weight GEMMs."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w1: Tensor, w3: Tensor, b1: Tensor | None, b3: Tensor | None,
        group: ProcessGroup | None, sequence_dim: int | None, fused: bool, overlap: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        # Autocast does not reach inside a custom Function's backward: cast once here, by hand.
        ctx.input_dtype = x.dtype
        dtype = compute_dtype(x)
        x, w1, w3, b1, b3 = (_cast(t, dtype) for t in (x, w1, w3, b1, b3))
        if sequence_dim is not None:
            # Gathered in the compute dtype (cast above) and contiguous: each GEMM reads it as it is.
            x = gather_sequence_blocks(x, group, sequence_dim)
        if fused:
            b = None if b1 is None else torch.cat((b1, b3))
            g, u = F.linear(x, torch.cat((w1, w3)), b).split((w1.shape[0], w3.shape[0]), dim=-1)
        else:
            g, u = F.linear(x, w1, b1), F.linear(x, w3, b3)
        # The weights, not their concatenation: a weight-sized copy kept per layer until backward
        # costs more than concatenating again there.
        ctx.save_for_backward(x, w1, w3)
        ctx.group, ctx.sequence_dim, ctx.fused, ctx.overlap = group, sequence_dim, fused, overlap
        ctx.has_bias, ctx.n1 = b1 is not None, w1.shape[0]
        return g, u

    @staticmethod
    def backward(ctx: Any, dg: Tensor, du: Tensor) -> tuple[Tensor | None, ...]:
        group, seq_dim = ctx.group, ctx.sequence_dim
        x, w1, w3 = ctx.saved_tensors
        if ctx.fused:
            # [w3; w1], not the forward's [w1; w3]: under torch.compile forward and backward are one
            # graph, where an identical concatenation would be merged with the forward's (CSE) and
            # then kept from forward, a weight-sized copy, since it feeds a GEMM. Same products.
            w = torch.cat((w3, w1))
            d = torch.cat((du, dg), dim=-1).reshape(-1, w.shape[0])
        else:
            dg, du = dg.reshape(-1, w1.shape[0]), du.reshape(-1, w3.shape[0])
        x2 = x.reshape(-1, x.shape[-1])

        dx = pending = None
        if ctx.needs_input_grad[0]:
            dx = (d @ w if ctx.fused else torch.addmm(dg @ w1, du, w3)).view(x.shape)
            # Reduced in the input's dtype (fp32 under autocast), as the reference path does; the
            # reduce-scatter casts as it sums (the narrow gradient on the wire).
            if group is not None and group.size() > 1 and seq_dim is not None:
                pending = _reduce_scatter_start(dx, group, seq_dim, ctx.input_dtype)
            elif group is not None and group.size() > 1:
                pending = _all_reduce_start(dx.to(ctx.input_dtype), group)
            else:
                dx = dx.to(ctx.input_dtype)
            if pending is not None:
                if not ctx.overlap:
                    dx, pending = _wait_input_grad(pending, seq_dim), None

        # Weight gradients: computed while the collective above is in flight.
        dw1 = dw3 = db1 = db3 = None
        if ctx.fused:
            n3 = w.shape[0] - ctx.n1
            dw = d.t() @ x2
            dw3, dw1 = dw[:n3], dw[n3:]
            if ctx.has_bias:
                db = d.sum(0)
                db3, db1 = db[:n3], db[n3:]
        else:
            dw1, dw3 = dg.t() @ x2, du.t() @ x2
            if ctx.has_bias:
                db1, db3 = dg.sum(0), du.sum(0)

        if pending is not None:
            dx = _wait_input_grad(pending, seq_dim)
        return dx, dw1, dw3, db1, db3, None, None, None, None


def gate_up_projection(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    b1: Tensor | None,
    b3: Tensor | None,
    group: ProcessGroup | None,
    *,
    sequence_dim: int | None = None,
    fused: bool = False,
    overlap: bool = True,
) -> tuple[Tensor, Tensor]:
    """Both column-parallel projections of the block behind one copy-to-parallel region.

    ``x [*, dim]`` (sequence parallel, ``sequence_dim`` given: ``[b, s/W, dim]``) ->
    ``g, u [*, n_r]`` (sequence parallel: ``[b, s, n_r]``). ``fused``: one GEMM on ``[w1; w3]``
    forward and one each for the input and weight gradients. ``overlap``: the input-gradient
    collective runs during the weight-gradient GEMMs. Communication is that of
    ``copy_to_parallel`` (one all-reduce in backward) or, with ``sequence_dim``, of
    ``gather_from_sequence`` (all-gather forward, reduce-scatter backward).
    """
    return _GateUp.apply(x, w1, w3, b1, b3, group, sequence_dim, fused, overlap)


class _RowParallelChunked(torch.autograd.Function):
    """Forward: per token chunk, ``act(g) * u``, the GEMM, then its all-reduce started. Saves ``g``,
    ``u``, ``w``. Backward: that of :func:`~tp_ffn.swiglu.swiglu_linear` (GEMMs, no communication)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor, w: Tensor, activation: str, group: ProcessGroup, chunks: int) -> Tensor:
        dtype = compute_dtype(g)
        g, u, w = g.to(dtype), u.to(dtype), w.to(dtype)
        ctx.save_for_backward(g, u, w)
        ctx.activation = activation
        g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        pending = [
            _all_reduce_start(act_mul(gc, uc, activation) @ w.t(), group)
            for gc, uc in zip(g2.tensor_split(chunks), u2.tensor_split(chunks))
        ]
        y = torch.cat([_wait(p) for p in pending])
        return y.view(*g.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        g, u, w = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        return (*swiglu_linear_backward(dy.to(w.dtype), g, u, w, ctx.activation, needs), None, None, None)


def row_parallel_chunked(g: Tensor, u: Tensor, w: Tensor, activation: str, group: ProcessGroup, chunks: int) -> Tensor:
    """``all_reduce((act(g) * u) w^T)`` in ``chunks`` token chunks whose all-reduces overlap the next
    chunk's GEMM, keeping only ``g``, ``u`` and ``w`` for backward. ``g, u [*, n_r]``,
    ``w [out, n_r]`` -> ``[*, out]``. Forward: ``chunks`` all-reduces (the bytes of one); backward:
    none, as for ``reduce_from_parallel``."""
    return _RowParallelChunked.apply(g, u, w, activation, group, chunks)
