"""The SwiGLU's elementwise work as one kernel each way in eager mode, compiled by inductor.

Eager mode runs ATen's kernels one by one: forward ``silu(g)``, then ``* u`` (two passes over the
hidden-size tensors); the two-tensor backward of :mod:`tp_ffn.swiglu` ``silu(g)``, ``dh * u``,
``silu_backward``, ``dh * act(g)`` and ``act(g) * u`` (five passes, the sigmoid computed twice).
Here each direction is one kernel, ``torch.compile`` of the elementwise function alone (inductor:
C++ on the CPU, Triton on CUDA)::

    forward   h = silu(g) * u                                reads g, u;      writes h
    backward  dg = silu'(g) (dh u), du = dh silu(g), h       reads dh, g, u;  writes dg, h, du (into dh)

Allocations: forward one buffer (``h``); backward two (``dg``, ``h``), ``du`` written over ``dh``
when the caller owns it: what the eager sequence allocates, in one pass instead of five (and small
temporaries for the few elements of ATen's scalar tail, below).

Exactness: each kernel is the arithmetic of the ATen kernels it replaces, operation for operation
(silu ``x / (1 + exp(-x))``; its derivative ``dy s (1 + x (1 - s))`` with ``s = 1 / (1 + exp(-x))``;
products in the operands' dtype), in fp32 for bf16/fp16 operands as ATen computes them, with two
compiler settings: the roundings to bf16/fp16 that the eager sequence makes between its kernels
are kept (inductor's ``emulate_precision_casts``; a fused kernel skips them by default), and
multiply-adds are contracted as in ATen's own build (its AVX-512 ``silu_backward`` computes
``1 + x (1 - s)`` as one fused multiply-add). One difference is left to undo: ATen's loops run the
last ``count mod 2 vectors`` elements of each contiguous stretch as scalar code, whose exp is the C
library's, where the fused kernel's (and ATen's vector code's) is Sleef's, up to an ulp apart; those
elements (:func:`_aten_tail`, at most 63 per stretch, none where ``n`` is a multiple of 64) are
recomputed by ATen's kernels. The result is ATen's bit for bit in fp32, float64 and bf16
(``tests/core/test_swiglu.py``) on one thread; with several, ATen splits tensors of 32768 elements or
more into per-thread pieces with tails of their own, which this does not follow (single elements
may then differ in the last bit). On CUDA (Triton) not checked yet.

Scope: silu only (the SwiGLU); gelu and relu run the eager kernels. Not under ``torch.compile``
(the caller's ATen formula is traced into its graph and fused there), nor with grad mode on (a
double backward differentiates the ATen formula), nor under a ``TorchDispatchMode`` (FakeTensor,
op counters such as :func:`tp_ffn.diagnostics.count_collectives`: dynamo compiles nothing there).
Compiled once per (function, dtype, device), dynamic shapes, the first call of each compiling it.
Where that fails (no C++ compiler, no Triton, a torch without inductor, ``TORCH_COMPILE_DISABLE=1``),
one warning line says so and the eager kernels run from then on (the same values, more passes);
where dynamo runs a body uncompiled (a ``force_eager`` stance, its recompile limit), the body runs
ATen's kernels. ``TP_FFN_FUSED_SWIGLU=0`` in the environment (or :data:`ENABLED` set to False)
chooses the eager kernels without a warning.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["ENABLED", "silu_mul", "silu_mul_backward"]

ENABLED: bool = os.environ.get("TP_FFN_FUSED_SWIGLU", "1") != "0"

aten = torch.ops.aten
_REDUCED = (torch.bfloat16, torch.float16)
_DEVICES = ("cpu", "cuda")
# Keep the roundings between eager kernels: a fused low-precision kernel skips them by default.
_OPTIONS = {"emulate_precision_casts": True, "cpp.enable_floating_point_contract_flag": "fast"}
_compiled: dict[tuple, Callable[..., Any]] = {}
_failed: set[tuple[torch.dtype, str]] = set()  # (dtype, device type) whose compilation failed once


def _up(t: Tensor) -> Tensor:
    """The dtype ATen's CPU and CUDA kernels compute in: fp32 for bf16/fp16, the tensor's own otherwise."""
    return t.float() if t.dtype in _REDUCED else t


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as the next eager kernel reads it: rounded to the dtype the previous one stored it in."""
    return t.to(dtype).to(t.dtype)


# Each body starts with the eager sequence of ATen's kernels, for when dynamo runs it without compiling
# (TORCH_COMPILE_DISABLE, its recompile limit, a "force_eager" stance): the same values as compiled,
# where the explicit formula run op by op would not be (torch.exp is not silu's exp).
def _silu_mul(g: Tensor, u: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return F.silu(g).mul_(u)
    gf = _up(g)
    a = _stored(gf / (1 + torch.exp(-gf)), g.dtype)  # aten silu
    return (a * _up(u)).to(g.dtype)  # aten mul


def _silu_mul_backward(dh: Tensor, g: Tensor, u: Tensor, need_h: bool, du_into_dh: bool) -> tuple[Tensor, ...]:
    if not torch.compiler.is_compiling():
        a = F.silu(g)
        dg = aten.silu_backward(dh * u, g)
        du = dh.mul_(a) if du_into_dh else dh * a
        out = (dg, a.mul_(u)) if need_h else (dg,)
        return out if du_into_dh else (*out, du)
    dtype = g.dtype
    gf, uf, dhf = _up(g), _up(u), _up(dh)
    e = torch.exp(-gf)
    a = _stored(gf / (1 + e), dtype)  # aten silu
    s = torch.reciprocal(1 + e)  # silu_backward's sigmoid: the same exp, shared
    dhu = _stored(dhf * uf, dtype)  # aten mul
    dg = (dhu * s * (1 + gf * (1 - s))).to(dtype)  # aten silu_backward(dh * u, g)
    du = (dhf * a).to(dtype)
    out = (dg,)
    if need_h:
        out += ((a * uf).to(dtype),)
    if du_into_dh:
        dh.copy_(du)  # inductor stores straight into dh: no buffer for du
        return out
    return (*out, du)


def _own_copy(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps compiled variants (and counts its
    recompile limit) per code object, so each (function, dtype, device) gets a cache of its own."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _run(fn: Callable[..., Any], t: Tensor, *args: Any) -> Any:
    """``fn(*args)`` compiled for ``t``'s dtype and device; None where the eager kernels must run."""
    where = (t.dtype, t.device.type)
    if not ENABLED or where[1] not in _DEVICES or where in _failed:
        return None
    if _get_current_dispatch_mode() is not None:
        return None  # dynamo compiles nothing under a dispatch mode (FakeTensor, op counters): ATen's kernels
    key = (fn.__name__, *(a for a in args if isinstance(a, bool)), *where)
    # Detached: the same guards whoever requires grad, and dynamo reads no .grad of a non-leaf.
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    # The same guards whether the caller runs under autocast (forward) or not (backward).
    with torch.autocast(where[1], enabled=False):
        if key in _compiled:
            return _compiled[key](*args)
        try:  # the first call compiles; a failure to compile leaves the inputs untouched
            tag = "_".join(str(k).replace("torch.", "") for k in key[1:])
            compiled = torch.compile(_own_copy(fn, tag), dynamic=True, fullgraph=True, options=_OPTIONS)
            out = compiled(*args)
        except Exception as e:  # noqa: BLE001 - whatever stops the compilation, the eager kernels can run
            _failed.add(where)  # both directions then run the eager kernels, and this warns once
            cause = getattr(e, "inner_exception", None) or e  # inductor's own error inside dynamo's
            reason = f"{type(cause).__name__}: " + (str(cause).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"tp_ffn: the fused SwiGLU kernels for {t.dtype} on {where[1]} could not be compiled "
                f"({reason}); running ATen's eager kernels instead (same values, more passes)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    _compiled[key] = compiled
    return out


def _ok(g: Tensor, *others: Tensor) -> bool:
    """Operands a kernel takes: one dtype and device, something to compute."""
    return g.numel() > 0 and g.dim() > 0 and all(t.dtype == g.dtype and t.device == g.device and t.shape == g.shape for t in others)


# ATen's CPU loops step two vectors at a time and leave the rest of each contiguous stretch to scalar
# code, whose exp is the C library's (the vector code's, and the fused kernel's, is Sleef's). 64 is a
# multiple of that step for every dtype up to AVX-512 (fp64 16, fp32 32, bf16 64).
_STEP = 64


def _aten_tail(g: Tensor) -> tuple[bool, int] | None:
    """Where ATen's kernels on ``g [R, n]`` (and on what is computed from it) run scalar code:
    ``(flat, start)``, the elements from ``start`` of the flattened tensor (contiguous ``g``: one
    stretch) or the columns from ``start`` of every row (strided rows); None where there are none
    or off the CPU. One stretch per thread: ATen splits tensors of 32768 elements and more over its
    threads, each piece with a tail of its own, which this does not follow."""
    if g.device.type != "cpu":
        return None
    flat = g.is_contiguous()
    length = g.numel() if flat else g.shape[-1]
    width = length % _STEP
    return (flat, length - width) if width else None


def _cut(t: Tensor, flat: bool, start: int) -> Tensor:
    """The tail of an output (``view``: an error, not a copy, if one ever came non-contiguous)."""
    return t.view(-1)[start:] if flat else t[:, start:]


def _flat_or_rows(tail: tuple[bool, int], *ts: Tensor) -> list[Tensor]:
    """The tails of inputs (read only: a copy will do, e.g. of an expanded gradient)."""
    flat, start = tail
    return [t.reshape(-1)[start:] if flat else t[:, start:] for t in ts]


def silu_mul(g: Tensor, u: Tensor) -> Tensor | None:
    """``silu(g) * u`` in one pass (``g, u [*, n]``, same dtype; rows may be strided), or None where
    the eager kernels must run (see the module docstring)."""
    if not _ok(g, u):
        return None
    g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
    h = _run(_silu_mul, g, g2, u2)
    if h is None:
        return None
    tail = _aten_tail(g2)
    if tail is not None:  # ATen's scalar tail, recomputed by ATen's kernels: its exp there
        gt, ut = _flat_or_rows(tail, g2, u2)
        _cut(h, *tail).copy_(F.silu(gt).mul_(ut))
    return h.view(g.shape)


def silu_mul_backward(
    dh: Tensor, g: Tensor, u: Tensor, *, need_h: bool, reuse_dh: bool
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(dg, du, h)`` for ``h = silu(g) * u`` from ``dh`` in one pass, or None where the eager
    kernels must run. ``h`` only with ``need_h``; ``reuse_dh``: ``dh`` (contiguous, the caller's)
    becomes ``du``. All ``[*, n]``, one dtype."""
    if not _ok(g, u, dh):
        return None
    into = reuse_dh and dh.is_contiguous()
    rows = [t.reshape(-1, t.shape[-1]) for t in (dh, g, u)]
    tail = _aten_tail(rows[1]) if ENABLED else None
    if tail is not None:  # ATen's scalar tail by ATen's kernels, before dh is overwritten
        dht, gt, ut = _flat_or_rows(tail, *rows)
        at = F.silu(gt)
        tails = (aten.silu_backward(dht * ut, gt), dht * at, at * ut)
    out = _run(_silu_mul_backward, g, *rows, need_h, into)
    if out is None:
        return None
    dg, rest = out[0], list(out[1:])
    h = rest.pop(0) if need_h else None
    du = rows[0] if into else rest.pop(0)
    if tail is not None:
        for full, part in zip((dg, du, h), tails):
            if full is not None:
                _cut(full, *tail).copy_(part)
    return dg.view(g.shape), du.view(g.shape), None if h is None else h.view(g.shape)
