"""Measuring memory: what autograd keeps for backward, a process's peak, and the CPU allocator.

:func:`saved_bytes` records the buffers autograd keeps (``saved_tensors_hooks``);
:func:`measure_ffn_saved` fits what :class:`~tp_ffn.ParallelFeedForward` keeps from tiny blocks, for
the memory plan (:mod:`tp_ffn.train.budget.memory`); :func:`reset_peak` / :func:`peak_bytes` measure a
run's peak (CPU: the resident set's high-water mark, VmHWM; CUDA: ``max_memory_allocated``); and
:func:`release_freed_memory` makes glibc give freed blocks back, so that the resident set follows
the tensors.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["FFNSaved", "measure_ffn_saved", "peak_bytes", "release_freed_memory", "reset_peak", "saved_bytes"]


@dataclass(frozen=True)
class FFNSaved:
    """Bytes the feed-forward block keeps for backward: ``tokens (per_token_dim dim + per_token_hidden
    n_r + per_token) + per_weight dim n_r + constant`` (``tokens``: of the full sequence; ``n_r``:
    this rank's rows)."""

    per_token_dim: float
    per_token_hidden: float
    per_weight: float = 0.0
    constant: float = 0.0
    per_token: float = 0.0

    def bytes(self, tokens: int, dim: int, n_r: int) -> float:
        return (
            tokens * (self.per_token_dim * dim + self.per_token_hidden * n_r + self.per_token)
            + self.per_weight * dim * n_r
            + self.constant
        )


@contextmanager
def saved_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """``with saved_bytes() as kept: ...`` then ``sum(kept.values())``: bytes of every buffer autograd
    keeps for backward of the code inside, each storage once; parameters (and views of them) and the
    storages of ``exclude`` (e.g. a model's buffers) are held anyway and not counted."""
    kept: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        storage = t.untyped_storage()
        if not isinstance(base, nn.Parameter) and storage.data_ptr() not in skip:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def measure_ffn_saved(
    group: Any, *, dtype: torch.dtype, device: torch.device, sequence_parallel: bool, modes: Mapping[str, Any]
) -> FFNSaved:
    """Fit what :class:`~tp_ffn.ParallelFeedForward` keeps for backward from five tiny blocks built
    on ``group`` (every rank of it must call this at once: the blocks communicate) with ``modes``
    (``fuse_gate_up``, ``overlap_comm``, ``comm_chunks``), in ``dtype``, their input requiring grad
    as in the model. Microseconds of compute; the model's widths are never allocated."""
    from ...ffn import ParallelFeedForward
    from ...groups import resolve_group

    tp = resolve_group(group).size
    sp = sequence_parallel and tp > 1
    t0 = 4 * tp  # tokens: two sequences (with one, a gathered sequence would be laid out as in the model only by luck)

    def kept(tokens: int, dim: int, n_r: int) -> int:
        ffn = ParallelFeedForward(
            dim, n_r * tp, group=group, sequence_parallel=sp, dtype=dtype, device=device, **modes
        )  # fmt: skip
        seq = tokens // 2
        x = torch.randn(2, seq // tp if sp else seq, dim, dtype=dtype, device=device).requires_grad_()
        with saved_bytes() as k:
            ffn(x)
        return sum(k.values())

    p0, p1, p2, p3, p4 = kept(t0, 8, 16), kept(2 * t0, 8, 16), kept(t0, 16, 16), kept(t0, 8, 32), kept(t0, 16, 32)
    c_w = ((p4 - p2) - (p3 - p0)) / 128
    c_d = (p2 - p0 - 128 * c_w) / (8 * t0)
    c_n = (p3 - p0 - 128 * c_w) / (16 * t0)
    c_t = (p1 - p0) / t0 - 8 * c_d - 16 * c_n
    const = p0 - t0 * (8 * c_d + 16 * c_n + c_t) - 128 * c_w
    return FFNSaved(c_d, c_n, c_w, const, c_t)


def reset_peak(device: torch.device) -> int:
    """Start measuring the peak memory of this process; returns the baseline :func:`peak_bytes` will
    be compared with (CPU: the resident set now; CUDA: bytes allocated now)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed here: the peak then counts from the process's start
    return _status_bytes("VmRSS:")


def peak_bytes(device: torch.device) -> int:
    """Peak allocated (CUDA) or peak resident (CPU, VmHWM) bytes since :func:`reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024
    except (OSError, StopIteration):
        return 0


def release_freed_memory() -> bool:
    """Make glibc hand every allocation of 128 KiB or more its own mapping, returned to the system
    when freed (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``); True when set.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), so
    activations, gathered parameters and gradients of a training step are then served from its
    heap, whose freed memory it keeps: in ``benchmarks/memory_check.py`` (100 M parameters, CPU) the
    resident set peaked 1.3-2.1x higher than with this setting (FSDP2 over dp 2 the most), while the
    plan counts the tensors. Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or without glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
