"""What a piece of code costs: the collectives it issues, the memory autograd keeps for backward.

Collectives are counted by a dispatch mode (``TorchDispatchMode``), which sees every ``c10d::``
and ``_c10d_functional::`` operator at the dispatcher, in forward and in backward: the count does
not depend on how the code under test imported or called ``torch.distributed`` (a monkeypatched
``dist.all_reduce`` would miss ``from torch.distributed import all_reduce`` and the functional
collectives). The mode is off while it runs an op, so a functional collective and the c10d op it
calls underneath count once. (They were counted from the torch profiler's record before, which
leaves a thread behind that can abort the interpreter's exit; see :mod:`tp_ffn.shutdown`.)

Saved activations are recorded with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an
op or autograd function saves for backward passes through the hook, whatever code saved it.

Peak CPU memory still comes from the profiler's allocation records (:func:`profile_step`); a script
that calls it ends with :func:`tp_ffn.shutdown.exit_without_teardown`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SavedForBackward",
    "StepProfile",
    "CollectiveCall",
    "count_collectives",
    "profile_step",
    "record_collectives",
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
    "c10d::alltoall_base_": "all_to_all",
    "c10d::alltoall_": "all_to_all",
    "_c10d_functional::all_reduce": "all_reduce",
    "_c10d_functional::all_reduce_": "all_reduce",
    "_c10d_functional::all_gather_into_tensor": "all_gather",
    "_c10d_functional::reduce_scatter_tensor": "reduce_scatter",
    "_c10d_functional::all_to_all_single": "all_to_all",
}


# Bookkeeping ops of the functional collectives, not communication.
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """``with count_collectives() as n: ...`` then ``n == Counter({'all_reduce': 1})``.

    Any other c10d op (broadcast, barrier, ...) is counted under its own name so it shows up.
    Nested blocks each count what runs inside them.
    """
    mode = _Collectives()
    with mode:
        yield mode.counts


@dataclass(frozen=True)
class CollectiveCall:
    """One collective: its kind (``all_reduce``, ``all_gather``, ...), the dtype and bytes of its
    largest tensor argument (the full buffer of an all-reduce, the gathered output of an
    all-gather, the input of a reduce-scatter)."""

    kind: str
    dtype: torch.dtype | None
    nbytes: int


@contextmanager
def record_collectives() -> Iterator[list[CollectiveCall]]:
    """``with record_collectives() as calls: ...`` then ``calls == [CollectiveCall('all_gather', torch.bfloat16, 4096), ...]``,
    in the order they were issued (forward and backward alike); :func:`count_collectives` counts the same calls."""
    mode = _Collectives()
    with mode:
        yield mode.calls


class _Collectives(TorchDispatchMode):
    """Counts the collective ops that reach the dispatcher by kind (``_KINDS``; others under their
    own name) and adds up the largest tensor argument of each: the full buffer an all-reduce
    reduces, the gathered output of an all-gather, the input of a reduce-scatter."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.nbytes = 0
        self.calls: list[CollectiveCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace in ("c10d", "_c10d_functional") and not func.__name__.startswith(_NOT_COLLECTIVES):
            name = func._schema.name  # e.g. "c10d::allreduce_"
            kind = _KINDS.get(name, name)
            self.counts[kind] += 1
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            largest = max(tensors, key=lambda t: t.numel() * t.element_size(), default=None)
            nbytes = 0 if largest is None else largest.numel() * largest.element_size()
            self.nbytes += nbytes
            self.calls.append(CollectiveCall(kind, None if largest is None else largest.dtype, nbytes))
        return func(*args, **(kwargs or {}))


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
    reduces, the gathered output of an all-gather, the input of a reduce-scatter).
    ``peak_bytes`` is the peak of memory allocated during the call on top of what was live before
    (CPU: from the profiler's allocation records; CUDA: ``torch.cuda.max_memory_allocated``).
    ``saved_bytes`` is what autograd kept for backward (:func:`saved_for_backward`, the
    ``exclude`` tensors aside): the activation memory a step holds between forward and backward.
    """

    collectives: Counter
    nbytes: int
    peak_bytes: int
    saved_bytes: int = 0
    calls: tuple[CollectiveCall, ...] = ()


def profile_step(
    step: Callable[[], object], device: torch.device | None = None, exclude: Iterable[torch.Tensor] = ()
) -> StepProfile:
    """Run ``step()`` once and report its collectives, their bytes, peak memory and the bytes saved
    for backward (buffers of ``exclude``, e.g. the parameters, not counted). On the CPU the peak
    comes from the profiler: end such a script with :func:`tp_ffn.shutdown.exit_without_teardown`."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    collectives = _Collectives()
    memory = nullcontext() if cuda else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with memory as prof, collectives, saved_for_backward(exclude) as saved:
        step()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        timeline = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage]
        live = peak = 0
        for _, delta in sorted(timeline):
            live += delta
            peak = max(peak, live)
    return StepProfile(collectives.counts, collectives.nbytes, peak, saved.nbytes, tuple(collectives.calls))
