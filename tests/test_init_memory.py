"""Initialising a shard must not materialise the full weight matrix on any rank.

Measured as the growth of the process's peak resident set (ru_maxrss) while the module is built,
in fresh processes so that earlier tests' peaks do not mask it. The control builds the dense block
afterwards and must raise the peak by about the full size, showing the measurement can see it.
"""

from __future__ import annotations

import resource

import pytest
import torch

from rankpool import run_fresh
from tp_ffn import FeedForward, ParallelFeedForward

DIM, HIDDEN = 2048, 8192  # one full matrix is 64 MiB of fp32
MiB = 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build(rank: int, world: int) -> dict[str, float]:
    torch.ones(1) @ torch.ones(1)  # warm up the allocator and BLAS before the baseline
    before = _peak_mib()
    par = ParallelFeedForward(DIM, HIDDEN)
    shard_mib = sum(p.numel() * p.element_size() for p in par.parameters()) / MiB
    grown = _peak_mib() - before
    base = _peak_mib()
    dense = FeedForward(DIM, HIDDEN)
    control = _peak_mib() - base
    del par, dense
    return {"shard_mib": shard_mib, "grown_mib": grown, "control_mib": control}


@pytest.mark.timeout(120)
def test_peak_memory_is_the_shard():
    full_mib = 3 * DIM * HIDDEN * 4 / MiB
    for r in run_fresh(2, _build):
        assert r["shard_mib"] == pytest.approx(full_mib / 2)
        # The shard itself plus a few MiB of scratch, far below one full matrix (64 MiB) on top.
        assert r["grown_mib"] < r["shard_mib"] + 24, r
        assert r["control_mib"] > 0.8 * full_mib, r
