"""torch.compile on ParallelFeedForward at world sizes 1 and 2 (gloo): no graph break in the block,
and the compiled block gives the eager block's output and gradients."""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import FeedForward, ParallelFeedForward, split_sequence

MODES = {
    "plain": {"fuse_gate_up": False, "overlap_comm": False},
    "fused+overlap": {"fuse_gate_up": True, "overlap_comm": True},
    "chunked": {"overlap_comm": True, "comm_chunks": 2},
    "sequence parallel": {"overlap_comm": True, "sequence_parallel": True},
}


def _graph_breaks(rank: int, world: int) -> dict[str, tuple[int, int, list[str]]]:
    import torch._dynamo as dynamo

    out = {}
    for name, options in MODES.items():
        torch.manual_seed(0)
        par = ParallelFeedForward(32, 72, bias=True, **options)
        x = torch.randn(2, 4, 32, requires_grad=True)
        dynamo.reset()
        explained = dynamo.explain(par)(x)
        out[name] = (
            explained.graph_count,
            explained.graph_break_count,
            [str(r.reason)[:200] for r in explained.break_reasons],
        )
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2])
def test_no_graph_breaks(world):
    for rank, got in enumerate(run_ranks(world, _graph_breaks, timeout=220)):
        for mode, (graphs, breaks, reasons) in got.items():
            assert (graphs, breaks) == (1, 0), f"W={world} rank {rank} {mode}: {graphs} graphs, breaks: {reasons}"


def _compiled_matches_eager(rank: int, world: int) -> dict[str, float]:
    import torch._dynamo as dynamo

    out = {}
    for name in ("fused+overlap", "sequence parallel"):
        torch.manual_seed(1)
        dense = FeedForward(32, 72, bias=True)
        par = ParallelFeedForward.from_dense(dense, **MODES[name])
        x = torch.randn(2, 4, 32)
        xl = split_sequence(x, par.tp.group) if par.sequence_parallel else x
        dynamo.reset()
        compiled = torch.compile(par, fullgraph=True)
        xe, xc = xl.clone().requires_grad_(), xl.clone().requires_grad_()
        ye = par(xe)
        ye.sum().backward()
        eager_grad = par.w1.weight.grad.clone()
        par.zero_grad()
        yc = compiled(xc)
        yc.sum().backward()
        out[f"{name} output"] = rel_err(yc, ye)
        out[f"{name} input grad"] = rel_err(xc.grad, xe.grad)
        out[f"{name} w1 grad"] = rel_err(par.w1.weight.grad, eager_grad)
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2])
def test_compiled_matches_eager(world):
    for rank, errs in enumerate(run_ranks(world, _compiled_matches_eager, timeout=380)):
        bad = {k: v for k, v in errs.items() if v > 1e-5}
        assert not bad, f"W={world} rank {rank}: {bad}"
