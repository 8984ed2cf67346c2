"""What a piece of code costs: the collectives it issues, the memory autograd keeps for backward.

Collectives are counted from the torch profiler's record of c10d ops. The profiler sees every
``c10d::`` operator at the dispatcher, so the count does not depend on how the code under test
imported or called ``torch.distributed`` (a monkeypatched ``dist.all_reduce`` would miss
``from torch.distributed import all_reduce`` and the functional collectives).

Saved activations are recorded with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an
op or autograd function saves for backward passes through the hook, whatever code saved it.

A script that used the profiler ends with :func:`exit_after_profiling` (see there why).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.utils._pytree as pytree
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SavedForBackward",
    "StepProfile",
    "count_collectives",
    "exit_after_profiling",
    "profile_step",
    "saved_for_backward",
]

_KINDS = {
    "c10d::allreduce_": "all_reduce",
    "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter",
    "c10d::reduce_scatter_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "_c10d_functional::all_reduce": "all_reduce",
    "_c10d_functional::all_reduce_": "all_reduce",
    "_c10d_functional::all_gather_into_tensor": "all_gather",
    "_c10d_functional::reduce_scatter_tensor": "reduce_scatter",
}


# Bookkeeping ops of the functional collectives, not communication.
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """``with count_collectives() as n: ...`` then ``n == Counter({'all_reduce': 1})``.

    Any other c10d op (broadcast, barrier, ...) is counted under its own name so it shows up.
    """
    counts: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    for kind, _ in _collectives(prof.events()):
        counts[kind] += 1


def _collectives(events: Iterable) -> Iterator[tuple[str, object]]:
    """``(kind, event)`` for each collective the profiler saw, outermost op only (a functional
    collective calls the c10d op underneath)."""
    for event in events:
        name = event.name
        if not name.startswith(("c10d::", "_c10d_functional::")) or name.endswith(_NOT_COLLECTIVES):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in _KINDS:
            parent = parent.cpu_parent
        if parent is None:
            yield _KINDS.get(name, name), event


@dataclass
class SavedForBackward:
    """The buffers autograd keeps for backward, each counted once: ``{key: (nbytes, numel)}``.

    A buffer is the storage under a saved tensor, whole: a tensor saved by two ops (the input of
    two GEMMs) counts once, and a view (one half of a concatenated GEMM output) keeps, and counts,
    the buffer it views.
    """

    buffers: dict[tuple[str, int], tuple[int, int]]

    @property
    def nbytes(self) -> int:
        return sum(b for b, _ in self.buffers.values())

    @property
    def numel(self) -> int:
        """Elements, each buffer's bytes over its saved tensor's element size."""
        return sum(n for _, n in self.buffers.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)  # a DTensor's storage is its local shard's


def _buffer_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


@contextmanager
def saved_for_backward(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedForBackward]:
    """``with saved_for_backward(model.parameters()) as saved: y = model(x)`` then ``saved.numel``.

    Records every buffer saved for backward by the code run inside, except those of ``exclude``
    (typically the parameters, which are held anyway). The saved tensors are kept as usual, so
    backward works afterwards; the record holds no reference to them.
    """
    skip = {_buffer_key(_local(t)) for t in exclude}
    record = SavedForBackward({})

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = _local(t)
        key = _buffer_key(local)
        if key not in skip and key not in record.buffers and local.layout == torch.strided:
            nbytes = local.untyped_storage().nbytes()
            record.buffers[key] = (nbytes, nbytes // local.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield record


@dataclass
class StepProfile:
    """What one call of a step function did: collectives by kind, bytes they carried, peak memory.

    ``nbytes`` counts, per collective, its largest tensor argument (the full buffer an all-reduce
    reduces, the gathered output of an all-gather, the input of a reduce-scatter), as seen by a
    dispatch mode.
    ``peak_bytes`` is the peak of memory allocated during the call on top of what was live before
    (CPU: from the profiler's allocation records; CUDA: ``torch.cuda.max_memory_allocated``).
    ``saved_bytes`` is what autograd kept for backward (:func:`saved_for_backward`, the
    ``exclude`` tensors aside): the activation memory a step holds between forward and backward.
    """

    collectives: Counter
    nbytes: int
    peak_bytes: int
    saved_bytes: int = 0


def profile_step(
    step: Callable[[], object], device: torch.device | None = None, exclude: Iterable[torch.Tensor] = ()
) -> StepProfile:
    """Run ``step()`` once under the profiler and report its collectives, their bytes, peak memory
    and the bytes saved for backward (buffers of ``exclude``, e.g. the parameters, not counted)."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    moved = _CollectiveBytes()
    with (
        profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda) as prof,
        moved,
        saved_for_backward(exclude) as saved,
    ):
        step()
    counts: Counter = Counter()
    events = prof.events()
    for kind, _ in _collectives(events):
        counts[kind] += 1
    timeline = [(e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        live = peak = 0
        for _, delta in sorted(timeline):
            live += delta
            peak = max(peak, live)
    return StepProfile(counts, moved.nbytes, peak, saved.nbytes)


class _CollectiveBytes(TorchDispatchMode):
    """Adds up the largest tensor argument of every collective op that reaches the dispatcher (the
    profiler does not record the shapes of the tensor lists that c10d ops take)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and not func.__name__.startswith(_NOT_COLLECTIVES):
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.nbytes += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))


def exit_after_profiling(code: int) -> NoReturn:
    """End the process with ``code`` without running C++ static destructors; output is flushed first.

    The profiler leaves kineto's config-polling thread running, and at interpreter exit that thread can
    race libtorch's static destructors: the process then dies with SIGABRT ("terminate called without
    an active exception") after its work is done. Seen on CI with torch 2.13.0's CPU build (parity.py
    and bench.py in the same run; never in 55 runs on a development machine); ``os._exit`` skips that
    teardown. Everything the script wrote must be closed before this is called.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)
