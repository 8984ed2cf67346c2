"""The gated activation ``act(g) * u`` with the down projection, keeping two tensors for backward.

Written as autograd sees it, the block ``w2(act(g) * u)`` keeps four hidden-size tensors per token
until backward: ``g`` (the activation's input), ``act(g)`` and ``u`` (the product's inputs) and
``h = act(g) * u`` (the down projection's input, for w2's weight gradient). Two suffice: ``g`` and
``u`` determine the rest, and the elementwise work to recompute it is small next to the GEMMs.

:func:`swiglu_linear` computes ``(act(g) * u) w^T`` in one autograd function that saves ``g``,
``u`` and the weight ``w`` only (``h`` is freed as soon as the GEMM has read it). Backward::

    dh = dy w                                   GEMM   [*, out] x [out, n] -> [*, n]
    a = act(g); h = a * u                       \\
    du = dh * a                                  > elementwise: one pass over g, u, dh
    dg = act'(g) * (dh * u)                     /
    dw = dy^T h                                 GEMM   [out, *] x [*, n] -> [out, n]

The derivative comes from the same ATen kernels autograd calls for ``F.silu`` / ``F.gelu`` /
``F.relu`` (``silu_backward``, ``gelu_backward``, ``threshold_backward``) on the same operands, so
the input gradients are bit for bit those of the plain composition in eager mode. The body is
ordinary ATen ops: ``torch.compile`` traces it, and inductor fuses the elementwise lines into one
kernel forward (``act(g) * u``) and one backward (``h``, ``du``, ``dg``). Under compile the saved
set is chosen anew (AOTAutograd partitions the joint forward-backward graph itself); the backward
is written so that the partition still keeps only ``g`` and ``u`` (see :func:`act_mul_backward`;
``tests/core/test_swiglu.py`` measures it). In eager mode (silu) the elementwise lines run as one
compiled kernel each way (:mod:`tp_ffn.swiglu_kernels`, bit for bit ATen's kernels), ATen's
kernels one by one where that is off or cannot compile.

:func:`swiglu` is the activation and product alone (``act(g) * u``, saving ``g`` and ``u``), for
code that applies the down projection itself and keeps ``h`` anyway.

Shapes: ``g, u [*, n]`` (a rank's shard of the hidden size), ``w [out, n]``, output ``[*, out]``.
Under ``torch.autocast`` the operands are cast once to the autocast dtype (the casts are what is
saved, as autocast itself would) and the gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import swiglu_kernels

__all__ = ["ACTIVATIONS", "get_activation", "swiglu", "swiglu_linear", "swiglu_linear_backward"]

aten = torch.ops.aten

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

# d act / d g applied to an incoming gradient: (grad, g, act(g)) -> grad * act'(g), the kernels
# autograd's own derivative formulas call.
_BACKWARD: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "silu": lambda grad, g, a: aten.silu_backward(grad, g),
    "gelu": lambda grad, g, a: aten.gelu_backward(grad, g),
    "gelu_tanh": lambda grad, g, a: aten.gelu_backward(grad, g, approximate="tanh"),
    "relu": lambda grad, g, a: aten.threshold_backward(grad, a, 0),
}

# The same kernels writing into ``out`` (eager mode: one buffer fewer to allocate and fault in).
_BACKWARD_INTO: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "silu": lambda grad, g, a, out: aten.silu_backward.grad_input(grad, g, grad_input=out),
    "gelu": lambda grad, g, a, out: aten.gelu_backward.grad_input(grad, g, grad_input=out),
    "gelu_tanh": lambda grad, g, a, out: aten.gelu_backward.grad_input(grad, g, approximate="tanh", grad_input=out),
    "relu": lambda grad, g, a, out: aten.threshold_backward.grad_input(grad, a, 0, grad_input=out),
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype GEMMs on ``x`` run in: autocast's where it is on for ``x``'s device and would cast
    ``x`` (a float tensor other than float64, which autocast leaves as it is), else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _eager(activation: str) -> bool:
    """Eager mode without autograd recording: where the fused kernels of :mod:`.swiglu_kernels` may run."""
    return activation == "silu" and not (torch.compiler.is_compiling() or torch.is_grad_enabled())


def act_mul(g: Tensor, u: Tensor, activation: str) -> Tensor:
    """``act(g) * u`` without autograd bookkeeping of its own (the callers' functions hold it)."""
    h = swiglu_kernels.silu_mul(g, u) if _eager(activation) else None
    if h is not None:
        return h
    a = ACTIVATIONS[activation](g)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # Out of place where traced (written u * act(g) so that it never equals the backward's
        # act(g) * u, see act_mul_backward) or where autograd records it.
        return u * a
    return a.mul_(u)  # eager: into act(g)'s fresh buffer (the same values as u * a, one allocation fewer)


def act_mul_backward(
    dh: Tensor, g: Tensor, u: Tensor, activation: str, *, need_h: bool = False, reuse_dh: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dg, du, h)`` for ``h = act(g) * u`` from the gradient ``dh`` and the saved ``g``, ``u``;
    ``h`` (recomputed) only with ``need_h``. All ``[*, n]``. ``reuse_dh``: ``dh`` is a buffer the
    caller owns, which becomes ``du`` (one allocation fewer in eager mode)."""
    fused = swiglu_kernels.silu_mul_backward(dh, g, u, need_h=need_h, reuse_dh=reuse_dh) if _eager(activation) else None
    if fused is not None:
        return fused
    a = ACTIVATIONS[activation](g)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # traced, or a double backward (create_graph=True): out= overloads do not differentiate
        dg = _BACKWARD[activation](dh * u, g, a)
    else:  # the same kernel, into the buffer of its own input: one allocation fewer
        dhu = dh * u
        dg = _BACKWARD_INTO[activation](dhu, g, a, dhu)
    du = dh.mul_(a) if reuse_dh else dh * a
    # a * u, where the forward has u * a: under torch.compile forward and backward are traced into
    # one graph, where a node identical to the forward's product would be merged with it (CSE) and
    # then kept from forward, since it feeds a GEMM, instead of recomputed here. (Same value.)
    return dg, du, (a.mul_(u) if need_h else None)


def swiglu_linear_backward(
    dy: Tensor, g: Tensor, u: Tensor, w: Tensor, activation: str, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dg, du, dw)`` of ``y = (act(g) * u) w^T`` from ``dy [*, out]`` and the saved
    ``g, u [*, n]``, ``w [out, n]``; ``needs`` says which inputs want one (others come back None)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    dg = du = dw = None
    if needs[0] or needs[1]:
        dh = (dy2 @ w).view(g.shape)
        dg, du, h = act_mul_backward(dh, g, u, activation, need_h=needs[2], reuse_dh=True)
        dg, du = (dg if needs[0] else None), (du if needs[1] else None)
    elif needs[2]:
        h = act_mul(g, u, activation)
    if needs[2]:
        dw = dy2.t() @ h.reshape(-1, h.shape[-1])
    return dg, du, dw


class _SwiGLULinear(torch.autograd.Function):
    """Forward: ``h = act(g) * u``, then ``h w^T``. Saves ``g``, ``u``, ``w``; backward recomputes ``h``."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor, w: Tensor, activation: str) -> Tensor:
        dtype = compute_dtype(g)
        g, u, w = g.to(dtype), u.to(dtype), w.to(dtype)
        ctx.save_for_backward(g, u, w)
        ctx.activation = activation
        return F.linear(act_mul(g, u, activation), w)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        g, u, w = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        return (*swiglu_linear_backward(dy.to(w.dtype), g, u, w, ctx.activation, needs), None)


class _SwiGLU(torch.autograd.Function):
    """Forward: ``act(g) * u``. Saves ``g`` and ``u``; backward recomputes ``act(g)``."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor, activation: str) -> Tensor:
        dtype = compute_dtype(g)
        g, u = g.to(dtype), u.to(dtype)
        ctx.save_for_backward(g, u)
        ctx.activation = activation
        return act_mul(g, u, activation)

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, ...]:
        g, u = ctx.saved_tensors
        dg, du, _ = act_mul_backward(dh.to(g.dtype), g, u, ctx.activation)
        return dg, du, None


def _check_activation(activation: str) -> str:
    get_activation(activation)
    return activation


def swiglu_linear(g: Tensor, u: Tensor, w: Tensor, activation: str = "silu") -> Tensor:
    """``(act(g) * u) w^T`` keeping only ``g``, ``u`` (and ``w``) for backward.

    ``g, u [*, n]``, ``w [out, n]`` -> ``[*, out]``; ``activation`` one of :data:`ACTIVATIONS`.
    No bias and no communication: a row-parallel layer reduces the result over its group.
    """
    return _SwiGLULinear.apply(g, u, w, _check_activation(activation))


def swiglu(g: Tensor, u: Tensor, activation: str = "silu") -> Tensor:
    """``act(g) * u`` keeping only ``g`` and ``u`` for backward (``act(g)`` is recomputed).
    ``g, u [*, n]`` -> ``[*, n]``."""
    return _SwiGLU.apply(g, u, _check_activation(activation))
