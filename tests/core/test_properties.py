"""Property tests (hypothesis): the parallel block, the shard arithmetic and the emulation over small shapes.

The multi-rank property draws the world size (1-4), dim (1-16), hidden (world size-40), the input
shape, bias, activation and sequence parallelism, shards a dense block with
``ParallelFeedForward.from_dense`` on a real gloo group and compares the output, the input gradient
and every rank's parameter gradients with the dense block's. It runs in float64 on both sides: with
shapes this small an fp32 output can be a single number that is a sum of two or three nearly
cancelling terms, where a correct fp32 result is legitimately far from float64 in relative terms and
a fixed tolerance would make the test flaky. In float64 the same cancellation costs ~1e-16 of the
terms, so 1e-9 relative holds with a margin of ~1e7 and is stricter than the 1e-5 of the fp32
suites: it also fails if a collective silently computes in fp32 (~1e-8 to 1e-7). The fp32 path (same
code, no dtype-specific branches) is covered at fixed shapes by test_ffn_parallel.py. Layout
mistakes (a missing shard, a wrong offset, a bias added twice, a gradient not reduced) give errors
>= 1e-3.

Each group of properties has a deterministic negative control below it, so a check that compares a
tensor with itself, or a tolerance that accepts anything, would be caught.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import (
    FeedForward,
    ParallelFeedForward,
    emulate_pretraining_tp,
    gather_sequence,
    shard_bounds,
    shard_sizes,
    split_sequence,
)
from tp_ffn.ffn import ACTIVATIONS

TOL64 = 1e-9


class Case(NamedTuple):
    world: int
    dim: int
    hidden: int
    shape: tuple[int, ...]  # leading dimensions of x; (batch, seq) with sequence parallelism
    bias: bool
    activation: str
    sequence_parallel: bool
    seed: int


@st.composite
def parallel_cases(draw: st.DrawFn) -> Case:
    world = draw(st.integers(1, 4))
    sp = draw(st.booleans())
    if sp:  # the sequence (dim 1) must split evenly over the ranks
        shape = (draw(st.integers(1, 3)), world * draw(st.integers(1, 3)))
    else:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    return Case(
        world=world,
        dim=draw(st.integers(1, 16)),
        hidden=draw(st.integers(world, 40)),
        shape=shape,
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        sequence_parallel=sp,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _parallel_vs_dense(rank: int, world: int, case: Case, rotate_w2: bool = False) -> dict[str, float]:
    """Output and input-gradient errors of the sharded block on this rank (float64 on both sides).

    ``rotate_w2`` plants a layout bug (each rank gets the next rank's w2 columns) for the control.
    """
    assert world == case.world
    torch.manual_seed(case.seed)  # same seed on every rank: same weights, input and output gradient
    dense = FeedForward(case.dim, case.hidden, bias=case.bias, activation=case.activation, dtype=torch.float64)
    x = torch.randn(*case.shape, case.dim, dtype=torch.float64)
    gy = torch.randn(*case.shape, case.dim, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    y_ref = dense(x_ref)
    y_ref.backward(gy)

    par = ParallelFeedForward.from_dense(dense, sequence_parallel=case.sequence_parallel)
    if rotate_w2:
        s, e = par.w2.start, par.w2.end
        nxt = e % case.hidden
        with torch.no_grad():
            par.w2.weight.copy_(dense.w2.weight[:, nxt : nxt + (e - s)])
    group = par.tp.group
    sp = case.sequence_parallel
    x_local = (split_sequence(x, group) if sp else x).detach().requires_grad_()
    y = par(x_local)
    y.backward(split_sequence(gy, group) if sp else gy)
    y_full = gather_sequence(y.detach(), group) if sp else y.detach()
    errs = {
        "output": rel_err(y_full, y_ref),
        "input_grad": rel_err(x_local.grad, split_sequence(x_ref.grad, group) if sp else x_ref.grad),
    }
    # Each rank's parameter gradients against its slice of the dense ones (no collective needed).
    s, e = par.w1.start, par.w1.end
    want = {
        "w1.weight": dense.w1.weight.grad[s:e],
        "w2.weight": dense.w2.weight.grad[:, s:e],
        "w3.weight": dense.w3.weight.grad[s:e],
    }
    if case.bias:
        want.update({
            "w1.bias": dense.w1.bias.grad[s:e],
            "w2.bias": dense.w2.bias.grad,
            "w3.bias": dense.w3.bias.grad[s:e],
        })  # fmt: skip
    got = dict(par.named_parameters())
    errs.update({f"{name} grad": rel_err(got[name].grad, w) for name, w in want.items()})
    return errs


@pytest.mark.timeout(240)
@settings(max_examples=25, deadline=None)
@given(case=parallel_cases())
# Every world size with and without sequence parallelism on every run, at the edges of the ranges:
# hidden == world size, dim 1, a 1-D input, uneven shards.
@example(case=Case(1, 2, 1, (1, 1), False, "silu", True, 7))
@example(case=Case(1, 7, 13, (2, 3), True, "gelu", False, 0))
@example(case=Case(2, 5, 11, (2, 4), True, "silu", True, 1))
@example(case=Case(2, 3, 2, (1, 1, 2), False, "relu", False, 6))
@example(case=Case(3, 4, 3, (1, 3), True, "gelu_tanh", True, 3))
@example(case=Case(3, 16, 40, (3,), False, "relu", False, 2))
@example(case=Case(4, 9, 37, (2, 8), True, "gelu", True, 5))
@example(case=Case(4, 1, 5, (), True, "silu", False, 4))
def test_parallel_matches_dense(case):
    event(f"world size {case.world}, sequence_parallel={case.sequence_parallel}")
    per_rank = run_ranks(case.world, _parallel_vs_dense, case)
    for rank, errs in enumerate(per_rank):
        for name, err in errs.items():
            assert err <= TOL64, f"{case}: rank {rank} {name} rel err {err:.2e} > {TOL64}"


@pytest.mark.timeout(120)
def test_parallel_check_detects_a_layout_bug():
    # hidden 12 splits evenly over 2 and 3 ranks, so the rotated blocks have the right shape.
    for world, sp in ((2, False), (3, True)):
        case = Case(world, 5, 12, (2, 3 * world), True, "silu", sp, 1)
        assert max(e["output"] for e in run_ranks(world, _parallel_vs_dense, case)) <= TOL64
        rotated = run_ranks(world, _parallel_vs_dense, case, True)
        assert min(e["output"] for e in rotated) > 1e-3
        assert min(e["input_grad"] for e in rotated) > 1e-3


# --- shard arithmetic ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), world=st.integers(1, 64))
def test_shard_sizes_are_tensor_split_sizes(n, world):
    assert shard_sizes(n, world) == [len(c) for c in torch.tensor_split(torch.arange(n), world)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), world=st.integers(1, 64))
def test_shard_bounds_are_contiguous_and_cover(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == n
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    assert [e - s for s, e in bounds] == shard_sizes(n, world)
    # And each block is the one tensor_split hands to that rank.
    for (s, e), chunk in zip(bounds, torch.tensor_split(torch.arange(n), world)):
        assert torch.equal(torch.arange(s, e), chunk)


def test_shard_checks_reject_another_convention():
    # Remainder on the last rank (a common alternative) must fail both properties.
    n, world = 11008, 3
    last_heavy = [n // world] * (world - 1) + [n - (world - 1) * (n // world)]
    assert shard_sizes(n, world) == [3670, 3669, 3669] != last_heavy
    assert [len(c) for c in torch.tensor_split(torch.arange(n), world)] != last_heavy


# --- emulation ---------------------------------------------------------------------------------------


@st.composite
def emulation_cases(draw: st.DrawFn) -> tuple:
    hidden = draw(st.integers(1, 40))
    return (
        draw(st.integers(1, 16)),  # dim
        hidden,
        draw(st.integers(1, hidden)),  # pretraining_tp
        tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))),  # leading dims of x
        draw(st.booleans()),  # bias
        draw(st.sampled_from(sorted(ACTIVATIONS))),
        draw(st.integers(0, 2**31 - 1)),  # seed
    )


def _emulation_errors(dim, hidden, k, lead, bias, activation, seed, *, perturb: float = 0.0) -> dict[str, float]:
    """Errors of the emulation against the dense block (float64). ``perturb`` scales the emulated
    block's w2 by ``1 + perturb`` for the negative control."""
    torch.manual_seed(seed)
    dense = FeedForward(dim, hidden, bias=bias, activation=activation, dtype=torch.float64)
    x = torch.randn(*lead, dim, dtype=torch.float64)
    gy = torch.randn(*lead, dim, dtype=torch.float64)
    xd = x.clone().requires_grad_()
    y_ref = dense(xd)
    y_ref.backward(gy)
    emulated = dense
    if perturb:
        sd = dense.state_dict()
        sd["w2.weight"] = sd["w2.weight"] * (1 + perturb)
        emulated = FeedForward.from_state_dict(sd, activation=activation)
    xe = x.clone().requires_grad_()
    y = emulate_pretraining_tp(emulated, xe, k)
    y.backward(gy)
    return {"output": rel_err(y, y_ref), "input_grad": rel_err(xe.grad, xd.grad)}


@settings(max_examples=150, deadline=None)
@given(args=emulation_cases())
def test_emulation_matches_dense(args):
    for name, err in _emulation_errors(*args).items():
        assert err <= TOL64, f"{args}: {name} rel err {err:.2e} > {TOL64}"


def test_emulation_check_detects_a_small_weight_error():
    # w2 off by 1e-6 relative: ten times below the fp32 suites' tolerance, yet the float64 check sees it.
    errs = _emulation_errors(8, 13, 3, (2, 5), True, "silu", 0, perturb=1e-6)
    assert errs["output"] > 10 * TOL64 and errs["input_grad"] > 10 * TOL64
