"""Initialising a shard must not materialise the full weight matrix on any rank.

Measured as the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) while the module is built, in fresh processes. ru_maxrss would not do: Linux
carries it across exec, so a child spawned by a large pytest process starts with the parent's peak.
The control builds the dense block afterwards and must raise the peak by about the full size,
showing the measurement can see it.
"""

from __future__ import annotations

import pytest
from support.rankpool import run_fresh

from tp_ffn import FeedForward, ParallelFeedForward

DIM, HIDDEN = 2048, 8192  # one full matrix is 64 MiB of fp32
MiB = 2**20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def _build(rank: int, world: int) -> dict[str, float]:
    # Touch the code and allocator paths first: their first use maps pages that are not the shard.
    ParallelFeedForward(8, 16)
    FeedForward(8, 16)
    _reset_peak()
    before = _peak_mib()
    par = ParallelFeedForward(DIM, HIDDEN)
    shard_mib = sum(p.numel() * p.element_size() for p in par.parameters()) / MiB
    grown = _peak_mib() - before
    _reset_peak()
    base = _peak_mib()
    dense = FeedForward(DIM, HIDDEN)
    control = _peak_mib() - base
    del par, dense
    return {"shard_mib": shard_mib, "grown_mib": grown, "control_mib": control}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_peak_memory_is_the_shard():
    full_mib = 3 * DIM * HIDDEN * 4 / MiB
    for r in run_fresh(2, _build):
        assert r["shard_mib"] == pytest.approx(full_mib / 2)
        # The shard itself plus a few MiB of scratch, far below one full matrix (64 MiB) on top.
        assert r["grown_mib"] < r["shard_mib"] + 24, r
        assert r["control_mib"] > 0.8 * full_mib, r
