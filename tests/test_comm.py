"""Collective counts of the FFN and the layers, and the autograd collectives on their own."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tp_ffn.diagnostics import count_collectives
from rankpool import run_ranks
from reference import rel_err
from tp_ffn import (
    FeedForward,
    ParallelFeedForward,
    copy_to_parallel,
    gather_from_parallel,
    gather_from_sequence,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
    scatter_to_parallel,
    split_sequence,
)


MODES = {
    "plain": {"fuse_gate_up": False, "overlap_comm": False},
    "overlap": {"overlap_comm": True},
    "fused+overlap": {"fuse_gate_up": True, "overlap_comm": True},
}


def _ffn_counts(rank: int, world: int, mode: str) -> dict:
    out = {}
    for sp in (False, True):
        for bias in (False, True):
            torch.manual_seed(0)
            par = ParallelFeedForward(16, 40, bias=bias, sequence_parallel=sp, **MODES[mode])
            x = torch.randn(2, 4 if sp else 4 * world, 16, requires_grad=True)
            with count_collectives() as fwd:
                y = par(x)
            with count_collectives() as bwd:
                y.sum().backward()
            out[(sp, bias)] = (fwd, bwd)
    return out


def _expected(world: int, sp: bool, bias: bool) -> tuple[Counter, Counter]:
    if world == 1:
        return Counter(), Counter()
    if not sp:
        return Counter(all_reduce=1), Counter(all_reduce=1)
    # Under SP the replicated w2 bias sees only local tokens: its gradient takes one all-reduce.
    return Counter(all_gather=1, reduce_scatter=1), Counter(all_gather=1, reduce_scatter=1, all_reduce=int(bias))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ffn_collective_counts(world, mode):
    for rank, got in enumerate(run_ranks(world, _ffn_counts, mode)):
        for (sp, bias), (fwd, bwd) in got.items():
            want_fwd, want_bwd = _expected(world, sp, bias)
            assert fwd == want_fwd, (
                f"W={world} rank {rank} sp={sp} bias={bias}: forward {dict(fwd)} != {dict(want_fwd)}"
            )
            assert bwd == want_bwd, (
                f"W={world} rank {rank} sp={sp} bias={bias}: backward {dict(bwd)} != {dict(want_bwd)}"
            )


def _meta_style_counts(rank: int, world: int) -> tuple[Counter, Counter]:
    # Negative control: the counter must see the extra all-reduce of fairscale's layout, where w1
    # and w3 each enter their own copy-to-parallel region.
    torch.manual_seed(0)
    par = ParallelFeedForward(16, 40)
    x = torch.randn(3, 16, requires_grad=True)
    g = par.tp.group
    w1 = torch.nn.functional.linear(copy_to_parallel(x, g), par.w1.weight)
    w3 = torch.nn.functional.linear(copy_to_parallel(x, g), par.w3.weight)
    with count_collectives() as fwd:
        y = par.w2.forward_parallel(torch.nn.functional.silu(w1) * w3)
    with count_collectives() as bwd:
        y.sum().backward()
    return fwd, bwd


@pytest.mark.timeout(60)
def test_counter_sees_the_two_allreduce_layout():
    for fwd, bwd in run_ranks(2, _meta_style_counts):
        assert fwd == Counter(all_reduce=1)
        assert bwd == Counter(all_reduce=2)


def _primitives(rank: int, world: int) -> dict[str, float]:
    """Each primitive's forward and backward against what it should compute on the full tensor."""
    group = torch.distributed.group.WORLD
    torch.manual_seed(0)
    full = torch.randn(2, 3 * world, 5, dtype=torch.float64)  # same on every rank
    mine = full.chunk(world, dim=1)[rank]
    sizes = [2 + (r % 2) for r in range(world)]  # uneven feature blocks
    wide = torch.randn(4, sum(sizes), dtype=torch.float64)
    start = sum(sizes[:rank])
    errs = {}

    # copy_to_parallel: identity forward; the backward sums the gradients of all ranks.
    x = full.clone().requires_grad_()
    y = copy_to_parallel(x, group)
    (y * (rank + 1)).sum().backward()
    errs["copy fwd"] = rel_err(y, full)
    errs["copy bwd"] = rel_err(x.grad, torch.full_like(full, world * (world + 1) / 2))

    # reduce_from_parallel: sum forward, identity backward.
    x = (full * (rank + 1)).detach().requires_grad_()
    y = reduce_from_parallel(x, group)
    y.backward(torch.ones_like(y))
    errs["reduce fwd"] = rel_err(y, full * world * (world + 1) / 2)
    errs["reduce bwd"] = rel_err(x.grad, torch.ones_like(full))

    # gather_from_parallel with uneven sizes: all-gather forward, own slice backward.
    x = wide[:, start : start + sizes[rank]].clone().requires_grad_()
    y = gather_from_parallel(x, group, -1, sizes)
    y.backward(wide * 2)
    errs["gather fwd"] = rel_err(y, wide)
    errs["gather bwd"] = rel_err(x.grad, 2 * wide[:, start : start + sizes[rank]])

    # scatter_to_parallel with uneven sizes: own slice forward, all-gather backward.
    x = wide.clone().requires_grad_()
    y = scatter_to_parallel(x, group, -1, sizes)
    y.backward(torch.ones_like(y) * (rank + 1))
    errs["scatter fwd"] = rel_err(y, wide[:, start : start + sizes[rank]])
    want = torch.cat([torch.full((4, s), float(r + 1), dtype=torch.float64) for r, s in enumerate(sizes)], dim=1)
    errs["scatter bwd"] = rel_err(x.grad, want)

    # gather_from_sequence: all-gather forward along dim 1, reduce-scatter backward.
    x = mine.clone().requires_grad_()
    y = gather_from_sequence(x, group, 1)
    y.backward(full * (rank + 1))
    errs["sp gather fwd"] = rel_err(y, full)
    errs["sp gather bwd"] = rel_err(x.grad, mine * world * (world + 1) / 2)

    # reduce_scatter_to_sequence: reduce-scatter forward, all-gather backward.
    x = (full * (rank + 1)).detach().requires_grad_()
    y = reduce_scatter_to_sequence(x, group, 1)
    y.backward(mine * 3)
    errs["sp reduce-scatter fwd"] = rel_err(y, mine * world * (world + 1) / 2)
    errs["sp reduce-scatter bwd"] = rel_err(x.grad, full * 3)

    # split_sequence: own block forward, all-gather backward.
    x = full.clone().requires_grad_()
    y = split_sequence(x, group, 1)
    y.backward(torch.ones_like(y))
    errs["split fwd"] = rel_err(y, mine)
    errs["split bwd"] = rel_err(x.grad, torch.ones_like(full))
    return errs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_primitives(world):
    for rank, errs in enumerate(run_ranks(world, _primitives)):
        bad = {k: v for k, v in errs.items() if v > 1e-12}
        assert not bad, f"rank {rank}: {bad}"


def test_single_process_needs_no_group():
    x = torch.randn(2, 6, 4, requires_grad=True)
    for fn in (copy_to_parallel, reduce_from_parallel, gather_from_sequence, split_sequence):
        assert fn(x, None) is x
    torch.manual_seed(0)
    dense = FeedForward(4, 10)
    torch.manual_seed(0)
    par = ParallelFeedForward(4, 10)
    with count_collectives() as n:
        par(x).sum().backward()
    assert n == Counter() and par.tp.size == 1
    assert rel_err(par(x), dense(x)) == 0


def _chunked_counts(rank: int, world: int) -> tuple[Counter, Counter]:
    torch.manual_seed(0)
    par = ParallelFeedForward(16, 40, bias=True, comm_chunks=4)
    x = torch.randn(2, 6, 16, requires_grad=True)
    with count_collectives() as fwd:
        y = par(x)
    with count_collectives() as bwd:
        y.sum().backward()
    return fwd, bwd


@pytest.mark.timeout(60)
def test_chunked_forward_counts():
    # Chunking splits the forward all-reduce (same bytes) and leaves backward at one all-reduce.
    for fwd, bwd in run_ranks(2, _chunked_counts):
        assert fwd == Counter(all_reduce=4) and bwd == Counter(all_reduce=1)


def _buffers_untouched(rank: int, world: int) -> dict[str, bool]:
    """The collectives must not write into their input or into the gradient they are handed."""
    group = torch.distributed.group.WORLD
    out = {}
    x = torch.arange(6.0).exp().requires_grad_()
    t = x * 1.0
    before = t.detach().clone()
    reduce_from_parallel(t, group).sum().backward()
    out["reduce input untouched"] = torch.equal(t.detach(), before)
    out["reduce grad through saved input"] = torch.equal(x.grad, torch.ones(6))

    a = torch.ones(3, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    gy = torch.full((3,), 2.0)
    z = copy_to_parallel(x, group) + a * 1.0  # the gradient of z feeds both branches
    z.backward(gy)
    out["shared gradient not reduced into the other branch"] = torch.equal(a.grad, gy)
    out["caller's gradient untouched"] = torch.equal(gy, torch.full((3,), 2.0))
    out["copy grad reduced"] = torch.equal(x.grad, gy * world)
    return out


@pytest.mark.timeout(60)
def test_collectives_own_their_buffers():
    for rank, got in enumerate(run_ranks(2, _buffers_untouched)):
        assert all(got.values()), f"rank {rank}: {got}"


def _bad_sizes(rank: int, world: int) -> list[str]:
    group = torch.distributed.group.WORLD
    msgs = []
    for fn, x, sizes in (
        (gather_from_parallel, torch.ones(2, 3), [3]),  # one entry for two ranks
        (gather_from_parallel, torch.ones(2, 3), [2, 2]),  # this rank's block is 3 wide
        (scatter_to_parallel, torch.ones(2, 5), [2, 2]),  # sums to 4, x has 5
    ):
        try:
            fn(x, group, -1, sizes)
            msgs.append("NO ERROR")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.timeout(60)
def test_sizes_are_checked():
    for msgs in run_ranks(2, _bad_sizes):
        assert all(m.startswith("sizes: expected 2 entries") for m in msgs), msgs
