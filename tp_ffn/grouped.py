"""Expert SwiGLU GEMMs grouped by expert, keeping only ``x``, ``g`` and ``u`` for backward.

The routed part of a mixture-of-experts block: every token goes to ``k`` experts. The ``N = T k``
(token, slot) pairs are sorted by expert (:func:`dispatch_by_expert`), so that each expert's rows are
one contiguous block, and each projection is one grouped GEMM over all experts
(``torch._grouped_mm`` with the block ends as ``offs``) or, where that op does not take the operands
(float64, strides not 16-byte aligned, no such op), a loop of one GEMM per expert that has rows::

    x [T, dim] --gather rows--> xs [N, dim]   (sorted by expert; Llama 4: xs * s)
    g = xs_e w1_e^T, u = xs_e w3_e^T          grouped GEMMs   [N, n]   (n: this rank's share of the hidden size)
    o = (act(g) * u)_e w2_e^T                 grouped GEMM    [N, dim] (Mixtral & co: o * s)
    y_t = sum over t's k rows of o            [T, dim]

``s [N]`` is the routing weight of each row. :func:`grouped_swiglu` is one autograd function that
saves ``x`` (not the ``k`` times larger ``xs``: gathered again in backward), ``g``, ``u``, ``s`` and two
index vectors; ``act(g) * u`` is recomputed in backward as in :func:`~tp_ffn.swiglu.swiglu_linear`.
The gradient of a routing weight needs no saved output either: ``d s_n = <dy_n, o_n / s_n>
= <dy_n w2_e, act(g_n) * u_n>`` is a dot product of two tensors backward has anyway (with the weight
on the input, ``d s_n = <d xs_n, x_n>``).

Under tensor parallelism each rank holds rows ``[start, end)`` of every expert's w1/w3 and the same
columns of w2, so ``y`` and ``d s`` are this rank's partial sums: the caller reduces them (one
activation-sized collective for ``y``, one ``[T, k]`` for ``d s``).

Rows are combined and the input gradient summed per token by a gather and a sum over the ``k`` slots,
in slot order, not by ``index_add_`` (atomic, so in no fixed order on GPUs): the result does not change
from run to run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, cached_property
from typing import Any

import torch
from torch import Tensor

from .swiglu import act_mul, act_mul_backward, compute_dtype

__all__ = ["ExpertDispatch", "ExpertGroups", "dispatch_by_expert", "grouped_mm_fits", "grouped_swiglu"]

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertGroups:
    """The rows per expert of a sorted routing: ``counts [E]`` (0 for an expert no token chose) and
    ``offsets [E]``, the int32 block ends that ``torch._grouped_mm`` takes as ``offs``."""

    def __init__(self, counts: Tensor) -> None:
        self.num_experts = counts.numel()
        self.counts = counts
        self.offsets = counts.cumsum(0).to(torch.int32)

    @cached_property
    def bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each expert's rows, on the host (a device sync on accelerators)."""
        ends = self.counts.cumsum(0).tolist()
        return [(end - count, end) for end, count in zip(ends, self.counts.tolist())]


class ExpertDispatch:
    """Where the ``N = T k`` (token, slot) pairs of a routing go, sorted by expert (stable: by token
    within an expert).

    ``order [N]``: the flat pair index ``t k + j`` of each sorted row; ``token_of [N]``: its token;
    ``combine [N]``: for each flat pair, its sorted row (the inverse of ``order``); ``groups``: rows
    per expert (:class:`ExpertGroups`).
    """

    def __init__(self, indices: Tensor, num_experts: int) -> None:
        tokens, k = indices.shape
        flat = indices.reshape(-1)
        self.tokens, self.top_k = tokens, k
        self.order = flat.argsort(stable=True)
        self.token_of = self.order // k
        self.combine = torch.empty_like(self.order)
        self.combine[self.order] = torch.arange(flat.numel(), device=flat.device)
        # scatter_add_ into E slots, not bincount: bincount sizes its output from the data (a device sync).
        self.groups = ExpertGroups(flat.new_zeros(num_experts).scatter_add_(0, flat, flat.new_ones(flat.shape)))

    def rows(self, t: Tensor) -> Tensor:
        """``t [T, d]`` -> ``[N, d]``, each token's row once per expert it goes to, sorted by expert."""
        return _rows(t, self.token_of)

    def sum_slots(self, rows: Tensor) -> Tensor:
        """``rows [N, d]`` (sorted) -> ``[T, d]``: each token's ``k`` rows summed, in slot order."""
        return _sum_slots(rows, self.combine, self.top_k)


def _rows(t: Tensor, token_of: Tensor | None) -> Tensor:
    return t if token_of is None else t.index_select(0, token_of)


def _sum_slots(rows: Tensor, combine: Tensor | None, k: int) -> Tensor:
    if combine is None:
        return rows
    return rows.index_select(0, combine).view(-1, k, rows.shape[-1]).sum(1)


def dispatch_by_expert(indices: Tensor, num_experts: int) -> ExpertDispatch:
    """Sort the pairs of ``indices [T, k]`` (expert ids) by expert; see :class:`ExpertDispatch`."""
    return ExpertDispatch(indices, num_experts)


def grouped_mm_fits(*mats: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands as they are: this torch has a kernel for their
    device and dtype (float32/bfloat16/float16; see :func:`_grouped_mm_runs`), and in each operand's
    last two dims one stride is 1 and the other a multiple of 16 bytes (plus 16-byte aligned data off
    the CPU): the checks of ATen's ``GroupedMMUtils.h`` in torch 2.13."""
    for t in mats:
        if t.dtype not in _GROUPED_DTYPES or not _grouped_mm_runs(t.device.type, t.dtype):
            return False
        if t.device.type != "cpu" and t.data_ptr() % 16:
            return False
        align = 16 // t.element_size()
        (rows, cols), (rs, cs) = t.shape[-2:], t.stride()[-2:]
        # The same order of tests as ATen: column-major first.
        if rs == 1 and cs >= max(1, rows):
            ok = cs % align == 0
        elif cs == 1 and rs >= max(1, cols):
            ok = rs % align == 0
        else:
            ok = False
        if not ok:
            return False
    return True


def _grouped_mm() -> Callable[..., Tensor] | None:
    """``torch._grouped_mm``, looked up at each call (None before torch 2.8)."""
    return getattr(torch, "_grouped_mm", None)


@cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs ``torch._grouped_mm`` on ``device_type`` in ``dtype``, found once by a
    product of 8 x 8 zeros (the op is private: it came in torch 2.8, on the CPU later, and its kernels
    differ by device and GPU generation)."""
    op = _grouped_mm()
    if op is None or device_type not in ("cpu", "cuda"):
        return False
    try:
        a = torch.zeros((8, 8), dtype=dtype, device=device_type)
        op(a, a.new_zeros((1, 8, 8)), offs=a.new_full((1,), 8, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _mm(a: Tensor, b: Tensor, groups: ExpertGroups | None, grouped: bool) -> Tensor:
    """``a [N, K]`` times ``b [E, K, M]`` expert by expert (rows of expert e by ``b[e]``) -> ``[N, M]``;
    with ``groups=None`` a plain ``a @ b`` (``b [K, M]``)."""
    if groups is None:
        return a @ b
    if grouped and grouped_mm_fits(a, b):
        return _grouped_mm()(a, b, offs=groups.offsets)
    out = a.new_empty((a.shape[0], b.shape[-1]))
    for e, (s, t) in enumerate(groups.bounds):
        if t > s:
            out[s:t] = a[s:t] @ b[e]
    return out


def _wgrad(a: Tensor, b: Tensor, groups: ExpertGroups | None, grouped: bool) -> Tensor:
    """Per expert ``a_e^T b_e`` for ``a [N, P]``, ``b [N, Q]`` -> ``[E, P, Q]`` (zeros for an expert
    without rows); with ``groups=None`` ``a^T b [P, Q]``."""
    if groups is None:
        return a.t() @ b
    if grouped and grouped_mm_fits(a.t(), b):
        return _grouped_mm()(a.t(), b, offs=groups.offsets)
    out = a.new_zeros((groups.num_experts, a.shape[-1], b.shape[-1]))
    for e, (s, t) in enumerate(groups.bounds):
        if t > s:
            out[e] = a[s:t].t() @ b[s:t]
    return out


def _t(w: Tensor) -> Tensor:
    return w.transpose(-2, -1)


class _GroupedSwiGLU(torch.autograd.Function):
    """Forward: the expert GEMMs of every row, weighted and summed per token. Saves ``x``, ``g``,
    ``u``, the weights and the scale; backward recomputes the rows of ``x`` and ``act(g) * u``."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, scale: Tensor | None,
        dispatch: ExpertDispatch | None, activation: str, scale_input: bool, grouped: bool,
    ) -> Tensor:  # fmt: skip
        # Autocast does not reach inside a custom Function: cast once here (what is saved, as autocast would).
        dtype = compute_dtype(x)
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
        scale = None if scale is None else scale.to(dtype)
        token_of, combine, groups = (None, None, None) if dispatch is None else (
            dispatch.token_of, dispatch.combine, dispatch.groups
        )  # fmt: skip
        xs = _rows(x, token_of)
        if scale is not None and scale_input:
            xs = xs * scale[:, None]
        g, u = _mm(xs, _t(w1), groups, grouped), _mm(xs, _t(w3), groups, grouped)
        del xs
        o = _mm(act_mul(g, u, activation), _t(w2), groups, grouped)
        if scale is not None and not scale_input:
            o.mul_(scale[:, None])  # o is this function's own buffer
        # The index vectors through save_for_backward too, so that saved-tensor hooks see (and count) them.
        ctx.save_for_backward(x, g, u, w1, w3, w2, scale, token_of, combine)
        ctx.groups, ctx.top_k = groups, None if dispatch is None else dispatch.top_k
        ctx.activation, ctx.scale_input, ctx.grouped = activation, scale_input, grouped
        return _sum_slots(o, combine, ctx.top_k)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, g, u, w1, w3, w2, scale, token_of, combine = ctx.saved_tensors
        d, act, grouped = ctx.groups, ctx.activation, ctx.grouped
        need_x, need_w1, need_w3, need_w2, need_s = ctx.needs_input_grad[:5]
        on_output = scale is not None and not ctx.scale_input
        on_input = scale is not None and ctx.scale_input
        dy = dy.to(w2.dtype)
        dys = _rows(dy, token_of)  # [N, dim]
        dh = _mm(dys, w2, d, grouped)  # [N, n]: d(act(g) * u) before the routing weight
        ds = None
        if on_output:
            h = act_mul(g, u, act)
            if need_s:
                ds = (dh * h).sum(-1)
            dh.mul_(scale[:, None])
            if need_w2:
                dys = dys * scale[:, None]
            dg, du, _ = act_mul_backward(dh, g, u, act, reuse_dh=True)
        else:
            dg, du, h = act_mul_backward(dh, g, u, act, need_h=need_w2, reuse_dh=True)
        dw2 = _wgrad(dys, h, d, grouped) if need_w2 else None
        del h, dys

        dw1 = dw3 = dx = None
        if need_w1 or need_w3 or on_input:
            xs = _rows(x, token_of)
            xs_in = xs * scale[:, None] if on_input else xs
            dw1 = _wgrad(dg, xs_in, d, grouped) if need_w1 else None
            dw3 = _wgrad(du, xs_in, d, grouped) if need_w3 else None
            del xs_in
        if need_x or (on_input and need_s):
            dxs = _mm(dg, w1, d, grouped)
            dxs += _mm(du, w3, d, grouped)
            if on_input:
                if need_s:
                    ds = (dxs * xs).sum(-1)
                dxs.mul_(scale[:, None])
            if need_x:
                dx = _sum_slots(dxs, combine, ctx.top_k)
        return dx, dw1, dw3, dw2, ds, None, None, None, None


def grouped_swiglu(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    scale: Tensor | None,
    dispatch: ExpertDispatch | None,
    activation: str = "silu",
    *,
    scale_input: bool = False,
    grouped: bool = True,
) -> Tensor:
    """Every routed row through its expert's SwiGLU, weighted and summed per token.

    ``x [T, dim]``; ``w1, w3 [E, n, dim]``, ``w2 [E, dim, n]`` (stacked experts, or this rank's rows /
    columns of each); ``dispatch`` from :func:`dispatch_by_expert`; ``scale [N]`` the routing weight of
    each sorted row (``None``: unweighted), applied to the expert's output, or with ``scale_input`` to
    its input (Llama 4). ``dispatch=None`` is one expert that every token goes to once: ``w1, w3
    [n, dim]``, ``w2 [dim, n]``, ``scale [T]`` (a shared expert and its gate). Returns ``[T, dim]``.
    ``grouped=False`` loops over the experts even where ``torch._grouped_mm`` would do. No
    communication.
    """
    return _GroupedSwiGLU.apply(x, w1, w3, w2, scale, dispatch, activation, bool(scale_input), bool(grouped))
