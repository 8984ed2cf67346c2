"""Collective counts of the FFN and the layers, and the autograd collectives on their own."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

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
from tp_ffn.diagnostics import count_collectives, record_collectives

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
    # Under SP the replicated w2 bias sees only local tokens: its gradient takes one all-reduce. On gloo
    # (these tests' backend) each reduce-scatter is an all-to-all and a sum (tp_ffn.comm._sums_by_all_to_all).
    return Counter(all_gather=1, all_to_all=1), Counter(all_gather=1, all_to_all=1, all_reduce=int(bias))


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


def _gather_in_compute_dtype(rank: int, world: int) -> dict:
    """gather_from_sequence(x, dtype=bf16) against gather_from_sequence(x).to(bf16): the values
    forward and the input gradient backward bit for bit, and what each all-gather carried. Batch 2
    along dim 1 (the blocks are laid out by a copy), batch 1 (no copy) and dim 0."""
    group = torch.distributed.group.WORLD
    out = {}
    for shape, dim in (((2, 3, 8), 1), ((1, 3, 8), 1), ((3, 2, 8), 0)):
        torch.manual_seed(rank)
        x = torch.randn(*shape)
        gy = torch.randn(*shape[:dim], shape[dim] * world, *shape[dim + 1 :]).bfloat16()
        got = []
        for early in (True, False):
            xl = x.clone().requires_grad_()
            with record_collectives() as calls:
                y = gather_from_sequence(xl, group, dim, dtype=torch.bfloat16) if early else gather_from_sequence(xl, group, dim).bfloat16()
                y.backward(gy)
            got.append((y.detach(), xl.grad, [(c.kind, c.dtype, c.nbytes) for c in calls], y.is_contiguous()))
        out[(shape, dim)] = got
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_gather_in_the_compute_dtype_is_bit_identical_at_half_the_bytes(world):
    for rank, got in enumerate(run_ranks(world, _gather_in_compute_dtype)):
        for (shape, dim), ((y, dx, calls, contiguous), (y0, dx0, calls0, _)) in got.items():
            where = f"W={world} rank {rank} {shape} dim {dim}"
            assert torch.equal(y, y0) and y.dtype == torch.bfloat16, where
            assert torch.equal(dx, dx0) and dx.dtype == torch.float32, where
            assert contiguous, where
            full = world * shape[0] * shape[1] * shape[2]
            others = full * (world - 1) // world  # what a rank sends of the gradient: the other ranks' blocks
            # The all-gather carries bf16 (2 bytes an element) instead of fp32 (4); so does the gradient's
            # reduce-scatter (an all-to-all on gloo), whose blocks are then summed in fp32 (the input's dtype,
            # as autograd does after a cast): the same bits as summing the fp32 gradient.
            assert calls == [("all_gather", torch.bfloat16, 2 * full), ("all_to_all", torch.bfloat16, 2 * others)], (where, calls)
            assert calls0 == [("all_gather", torch.float32, 4 * full), ("all_to_all", torch.float32, 4 * others)], (where, calls0)


def _sp_block_dtypes(rank: int, world: int) -> dict:
    """ParallelFeedForward with sequence parallelism under bf16 autocast, each mode against the
    composition its reference path ran before (gather in fp32, then cast): output, input and
    weight gradients bit for bit (the reference path), and the dtype and bytes of every collective."""
    from tp_ffn.swiglu import swiglu_linear

    group = torch.distributed.group.WORLD
    out = {}
    for mode, options in MODES.items():
        torch.manual_seed(5)
        dense = FeedForward(16, 40, bias=True)
        x = split_sequence(torch.randn(2, 4 * world, 16), group)
        gy = split_sequence(torch.randn(2, 4 * world, 16), group).bfloat16()
        par = ParallelFeedForward.from_dense(dense, sequence_parallel=True, **options)
        xl = x.clone().requires_grad_()
        with record_collectives() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
            y = par(xl)
            y.backward(gy)
        grads = [xl.grad] + [p.grad for p in par.parameters()]
        # Before: the reference path gathered the fp32 input and cast it after.
        par.zero_grad()
        xb = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xf = gather_from_sequence(xb, group).to(torch.bfloat16).contiguous()
            g, u = (torch.nn.functional.linear(xf, w.weight, w.bias) for w in (par.w1, par.w3))
            y0 = par.w2.reduce_partial(swiglu_linear(g, u, par.w2.weight))
            y0.backward(gy)
        before = [xb.grad] + [p.grad for p in par.parameters()]
        out[mode] = (torch.equal(y, y0), all(torch.equal(a, b) for a, b in zip(grads, before)),
                     [(c.kind, c.dtype, c.nbytes) for c in calls])  # fmt: skip
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_collectives_carry_the_compute_dtype(world):
    tokens, dim = 2 * 4 * world, 16
    bf16 = tokens * dim * 2
    sent = bf16 * (world - 1) // world  # a reduce-scatter by all-to-all sends the other ranks' blocks
    want = [
        ("all_gather", torch.bfloat16, bf16),  # the input, cast first
        ("all_to_all", torch.bfloat16, sent),  # the output's partial sums (reduce-scatter, on gloo)
        ("all_gather", torch.bfloat16, bf16),  # backward: the output gradient (bf16, as the caller's)
        ("all_to_all", torch.bfloat16, sent),  # backward: the input gradient, bf16 on the wire, summed in fp32
        ("all_reduce", torch.float32, dim * 4),  # backward: w2's bias gradient
    ]
    for rank, got in enumerate(run_ranks(world, _sp_block_dtypes)):
        for mode, (same_y, same_grads, calls) in got.items():
            assert sorted(calls, key=str) == sorted(want, key=str), (world, rank, mode, calls)
            if mode == "plain":  # the reference path: bit for bit what it computed before
                assert same_y and same_grads, (world, rank, mode, same_y, same_grads)


def _scatter_sums(rank: int, world: int) -> dict:
    """reduce_scatter_sequence_blocks on gloo (an all-to-all and a sum), sync and async, against this
    rank's block of every rank's tensor summed here in rank order (all-gathered by hand), and against
    gloo's own reduce-scatter of the same values; and its other branch (the backend's reduce-scatter,
    what NCCL runs) on the same input."""
    from tp_ffn import comm
    from tp_ffn.comm import reduce_scatter_sequence_blocks

    group = torch.distributed.group.WORLD
    out = {}
    for shape, dim in (((2, 3 * world, 8), 1), ((1, 3 * world, 8), 1), ((3 * world, 2, 8), 0)):
        pairs = ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                 (torch.float32, torch.bfloat16))  # fmt: skip
        for wire, dtype in pairs:
            torch.manual_seed(100 + rank)
            x = torch.randn(*shape).to(wire)
            every = [torch.empty_like(x) for _ in range(world)]
            torch.distributed.all_gather(every, x)
            want = every[0].to(dtype)
            for t in every[1:]:
                want = want + t.to(dtype)
            want = want.narrow(dim, rank * 3, 3)
            native = torch.empty_like(want).contiguous()
            by_rank = x.to(dtype).reshape(*shape[:dim], world, 3, *shape[dim + 1 :]).movedim(dim, 0).contiguous()
            torch.distributed.reduce_scatter_tensor(native, by_rank.view(-1, *native.shape[1:]))
            native = native.view(*shape[:dim], 3, *shape[dim + 1 :])
            x0 = x.clone()
            got = reduce_scatter_sequence_blocks(x, group, dim, dtype=dtype)
            pending_out, work = reduce_scatter_sequence_blocks(x, group, dim, dtype=dtype, async_op=True)
            work.wait()
            picks, comm._sums_by_all_to_all = comm._sums_by_all_to_all, lambda *a: False
            try:
                backends = reduce_scatter_sequence_blocks(x, group, dim, dtype=dtype)
            finally:
                comm._sums_by_all_to_all = picks
            out[(shape, dim, wire, dtype)] = (got, pending_out, want, native, backends, torch.equal(x, x0))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_scatter_by_all_to_all_sums_in_rank_order(world):
    for rank, got in enumerate(run_ranks(world, _scatter_sums)):
        for (shape, dim, wire, dtype), (y, y_async, want, native, backends, untouched) in got.items():
            where = f"W={world} rank {rank} {shape} dim {dim} {wire}->{dtype}"
            assert y.dtype == dtype and y.is_contiguous() and y.shape == want.shape, where
            assert torch.equal(y, want) and torch.equal(y_async, want), where
            if world == 2:  # two addends: any order gives the same bits, gloo's included
                assert torch.equal(y, native), where
            else:
                assert torch.allclose(y, native, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2), where
            assert untouched, where  # the input is not written
            # The backend's reduce-scatter branch (NCCL's): gloo's values, laid out as the other branch's.
            assert torch.equal(backends, native) and backends.is_contiguous(), where
