"""The schedule of the overlapped backward: the input-gradient collective is started before the
weight-gradient GEMMs and waited for after them (``overlap_comm=True``), or waited for at once
(``overlap_comm=False``). Checked from the order of the ops the dispatcher sees, not from timing."""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from tp_ffn import FeedForward, ParallelFeedForward, split_sequence

aten = torch.ops.aten


class _OpLog(TorchDispatchMode):
    """Logs GEMMs and collectives as the dispatcher sees them, and every wait of ``tp_ffn.fused``
    (a c10d Work wait is no dispatcher op), into ``events``."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __enter__(self):
        from tp_ffn import fused

        self._wait = original = fused._wait

        def logged_wait(pending):
            self.events.append("wait")
            return original(pending)

        fused._wait = logged_wait  # the pool's processes outlive a test: restored in __exit__
        return super().__enter__()

    def __exit__(self, *exc):
        from tp_ffn import fused

        fused._wait = self._wait
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func in (aten.mm.default, aten.addmm.default):
            self.events.append("gemm")
        elif "allreduce" in name or "all_reduce" in name:
            self.events.append("all_reduce")
        elif "reduce_scatter" in name:
            self.events.append("reduce_scatter")
        elif "alltoall" in name:
            self.events.append("all_to_all")
        return func(*args, **(kwargs or {}))


def _backward_schedule(rank: int, world: int, modes: dict) -> list[str]:
    torch.manual_seed(0)
    par = ParallelFeedForward.from_dense(FeedForward(32, 72), **modes)
    x = torch.randn(2, 4, 32)
    x = (split_sequence(x, par.tp.group) if par.sequence_parallel else x).requires_grad_()
    y = par(x)
    events: list[str] = []
    with _OpLog(events):
        y.sum().backward()
    return events


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "modes, collective",
    [
        ({"overlap_comm": True}, "all_reduce"),
        ({"overlap_comm": True, "fuse_gate_up": True}, "all_reduce"),
        # SP's reduce-scatter of the input gradient: an all-to-all and a sum on gloo (tp_ffn.comm).
        ({"overlap_comm": True, "sequence_parallel": True}, "all_to_all"),
        ({"overlap_comm": False, "fuse_gate_up": True}, "all_reduce"),
    ],
)
def test_input_grad_collective_runs_during_weight_gemms(modes, collective):
    gemms = 1 if modes.get("fuse_gate_up") else 2  # dw1 and dw3, or one GEMM for [dw1; dw3]
    for rank, events in enumerate(run_ranks(2, _backward_schedule, modes)):
        assert events.count(collective) == 1, (rank, events)
        tail = events[events.index(collective) + 1 :]
        if modes["overlap_comm"]:
            assert tail == ["gemm"] * gemms + ["wait"], (rank, events)
        else:
            assert tail == ["wait"] + ["gemm"] * gemms, (rank, events)


def _forward_schedule(rank: int, world: int, chunks: int) -> list[str]:
    torch.manual_seed(0)
    par = ParallelFeedForward.from_dense(FeedForward(32, 72), comm_chunks=chunks)
    events: list[str] = []
    with _OpLog(events):
        par(torch.randn(2, 6, 32))
    return events


@pytest.mark.timeout(120)
def test_chunked_forward_starts_each_all_reduce_before_the_next_gemm():
    for rank, events in enumerate(run_ranks(2, _forward_schedule, 3)):
        # w1 and w3, then per chunk: the down-projection GEMM and its all-reduce started; waits last.
        assert events == ["gemm", "gemm"] + ["gemm", "all_reduce"] * 3 + ["wait"] * 3, (rank, events)
