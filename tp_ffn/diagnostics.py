"""Count the collectives a piece of code issues, from the torch profiler's record of c10d ops.

The profiler sees every ``c10d::`` operator at the dispatcher, so the count does not depend on
how the code under test imported or called ``torch.distributed`` (a monkeypatched
``dist.all_reduce`` would miss ``from torch.distributed import all_reduce`` and the functional
collectives).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from torch.profiler import ProfilerActivity, profile

__all__ = ["count_collectives"]

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
    for event in prof.events():
        name = event.name
        if not name.startswith(("c10d::", "_c10d_functional::")) or name.endswith(_NOT_COLLECTIVES):
            continue
        # A functional collective calls the c10d op underneath: count the outermost one only.
        parent = event.cpu_parent
        while parent is not None and parent.name not in _KINDS:
            parent = parent.cpu_parent
        if parent is None:
            counts[_KINDS.get(name, name)] += 1
