"""Count the collectives a piece of code issues, from the torch profiler's record of c10d ops.

The profiler sees every ``c10d::`` operator at the dispatcher, so the count does not depend on
how the code under test imported or called ``torch.distributed`` (a monkeypatched
``dist.all_reduce`` would miss ``from torch.distributed import all_reduce`` and the functional
collectives).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StepProfile", "count_collectives", "profile_step"]

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
class StepProfile:
    """What one call of a step function did: collectives by kind, bytes they carried, peak memory.

    ``nbytes`` counts, per collective, its largest tensor argument (the full buffer an all-reduce
    reduces, the gathered output of an all-gather, the input of a reduce-scatter), as seen by a
    dispatch mode.
    ``peak_bytes`` is the peak of memory allocated during the call on top of what was live before
    (CPU: from the profiler's allocation records; CUDA: ``torch.cuda.max_memory_allocated``).
    """

    collectives: Counter
    nbytes: int
    peak_bytes: int


def profile_step(step: Callable[[], object], device: torch.device | None = None) -> StepProfile:
    """Run ``step()`` once under the profiler and report its collectives, their bytes and peak memory."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    moved = _CollectiveBytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda) as prof, moved:
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
    return StepProfile(counts, moved.nbytes, peak)


class _CollectiveBytes(TorchDispatchMode):
    """Adds up the largest tensor argument of every collective op that reaches the dispatcher (the
    profiler does not record the shapes of the tensor lists that c10d ops take)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace in ("c10d", "_c10d_functional") and not func.__name__.startswith(_NOT_COLLECTIVES):
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.nbytes += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))
