"""ParallelFeedForward against the dense float64 reference on real gloo groups of 1-4 ranks.

Tolerances: fp32 against float64 with a reduction over at most 101 hidden units and a few dozen
tokens; the error is a few ulps of fp32 (~1e-7 relative), so 1e-5 leaves two orders of margin
while any real mistake (a missing shard, a bias added twice, a gradient not reduced) is >= 1e-2.
Each test carries a negative control so that its assertion cannot pass vacuously.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import dense64, rel_err, worst

from tp_ffn import FeedForward, ParallelFeedForward, emulate_pretraining_tp, gather_sequence, split_sequence
from tp_ffn.comm import all_gather_along

DIM, HIDDEN, BATCH, SEQ = 24, 101, 2, 12  # 101 is uneven over 2, 3 and 4 ranks; 12 divides by 1-4
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
TOL = 1e-5
# Execution modes of ParallelFeedForward; comm_chunks does not combine with sequence parallelism.
MODES = {
    "plain": {"fuse_gate_up": False, "overlap_comm": False},
    "overlap": {"fuse_gate_up": False, "overlap_comm": True},
    "fused": {"fuse_gate_up": True, "overlap_comm": False},
    "fused+overlap+chunks": {"fuse_gate_up": True, "overlap_comm": True, "comm_chunks": 3},
}


def _full_grads(par: ParallelFeedForward) -> dict[str, torch.Tensor]:
    """Every parameter's gradient gathered to its full (dense) shape, Meta keys."""
    g, sizes = par.tp.group, par.w1.shard_sizes
    out = {
        "w1.weight": all_gather_along(par.w1.weight.grad, g, 0, sizes),
        "w2.weight": all_gather_along(par.w2.weight.grad, g, 1, sizes),
        "w3.weight": all_gather_along(par.w3.weight.grad, g, 0, sizes),
    }
    if par.w1.bias is not None:
        out["w1.bias"] = all_gather_along(par.w1.bias.grad, g, 0, sizes)
        out["w2.bias"] = par.w2.bias.grad
        out["w3.bias"] = all_gather_along(par.w3.bias.grad, g, 0, sizes)
    return out


def _one_case(world: int, mode: str, activation: str, bias: bool, sp: bool) -> dict[str, float]:
    torch.manual_seed(1000 + 7 * bias + 3 * sp)
    dense = FeedForward(DIM, HIDDEN, bias=bias, activation=activation)
    x = torch.randn(BATCH, SEQ, DIM)
    gy = torch.randn(BATCH, SEQ, DIM)

    ref = dense64(dense)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.backward(gy.double())
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=0.1).step()

    options = dict(MODES[mode])
    if sp:
        options.pop("comm_chunks", None)
    par = ParallelFeedForward.from_dense(dense, sequence_parallel=sp, **options)
    group = par.tp.group
    xl = (split_sequence(x, group) if sp else x).detach().requires_grad_()
    y = par(xl)
    y.backward(split_sequence(gy, group) if sp else gy)
    y_full = gather_sequence(y.detach(), group) if sp else y.detach()
    grads = _full_grads(par)
    torch.optim.SGD(par.parameters(), lr=0.1).step()
    after = par.dense_state_dict()

    m = {
        "output": rel_err(y_full, y64),
        "input_grad": rel_err(xl.grad, split_sequence(x64.grad, group) if sp else x64.grad),
        "emulation_vs_parallel": rel_err(y_full, emulate_pretraining_tp(dense, x, world)),
    }
    m.update({f"grad {k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    m.update({f"after SGD {k}": rel_err(after[k], v) for k, v in ref.state_dict().items()})
    if bias and world > 1:
        # Negative control: the classic bug of adding the row-parallel bias on every rank.
        m["control: bias added per rank"] = -rel_err(y_full + (world - 1) * dense.w2.bias, y64)
    if bias and sp:
        m["w2 bias grad"] = par.w2.bias.grad.clone()  # compared across ranks by the caller
    if world == 1:
        # World size 1 against the fp32 dense block itself: output and every gradient within 1e-6.
        xd = x.clone().requires_grad_()
        dense(xd).backward(gy)
        m["ws1 fp32 output"] = rel_err(y_full, dense(x))
        m["ws1 fp32 input_grad"] = rel_err(xl.grad, xd.grad)
        for k, p in dense.named_parameters():
            m[f"ws1 fp32 grad {k}"] = rel_err(grads[k], p.grad)
    return m


def _equivalence(rank: int, world: int, mode: str) -> dict[tuple, dict]:
    cases = itertools.product(ACTIVATIONS, (False, True), (False, True))
    return {case: _one_case(world, mode, *case) for case in cases}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_dense_float64(world, mode):
    per_rank = run_ranks(world, _equivalence, mode)
    failures = []
    for case in per_rank[0]:
        ranks = [r[case] for r in per_rank]
        if "w2 bias grad" in ranks[0]:
            bias_grads = [r.pop("w2 bias grad") for r in ranks]
            if not all(torch.equal(g, bias_grads[0]) for g in bias_grads):
                failures.append(f"{case}: w2 bias gradient differs between ranks under sequence parallelism")
        for name, err in worst(ranks).items():
            if name.startswith("control"):
                if -err < 1e-3:
                    failures.append(f"{case}: {name} was not detected (err {-err:.2e})")
            elif name.startswith(("ws1", "emulation")):
                if err > 1e-6:
                    failures.append(f"{case}: {name} rel err {err:.2e} > 1e-6")
            elif err > TOL:
                failures.append(f"{case}: {name} rel err {err:.2e} > {TOL}")
    assert not failures, "\n".join(failures)


def _init_state(rank: int, world: int) -> dict:
    out = {}
    for bias, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        torch.manual_seed(42)
        par = ParallelFeedForward(DIM, HIDDEN, bias=bias, dtype=dtype)
        after_build = torch.get_rng_state()
        out[(bias, dtype)] = (par.dense_state_dict(), after_build, torch.rand(3))
    return out


@pytest.mark.timeout(120)
def test_init_is_independent_of_world_size():
    want = {}
    for bias, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        torch.manual_seed(42)
        dense = FeedForward(DIM, HIDDEN, bias=bias, dtype=dtype)
        want[(bias, dtype)] = (dense.state_dict(), torch.get_rng_state())
    for world in (1, 2, 3, 4):
        for rank, got in enumerate(run_ranks(world, _init_state)):
            for key, (sd, rng, drawn_after) in got.items():
                ref_sd, ref_rng = want[key]
                assert list(sd) == list(ref_sd)
                for k in sd:
                    assert torch.equal(sd[k], ref_sd[k]), f"W={world} rank {rank} {key}: {k} differs from FeedForward"
                assert torch.equal(rng, ref_rng), f"W={world} rank {rank} {key}: RNG state after build differs"
    # Negative control: a different seed gives different weights, so the equality above means something.
    torch.manual_seed(43)
    assert not torch.equal(FeedForward(DIM, HIDDEN).w1.weight, want[(False, torch.float32)][0]["w1.weight"])


def test_meta_device_builds_without_drawing():
    state = torch.get_rng_state()
    par = ParallelFeedForward(4096, 11008, device="meta")
    assert par.w1.weight.is_meta and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    dense = FeedForward(64, 96, bias=True)
    par = ParallelFeedForward(64, 96, bias=True, device="meta")
    par.load_dense_state_dict(dense.state_dict())
    assert not par.w1.weight.is_meta
    x = torch.randn(3, 64)
    assert rel_err(par(x), dense(x)) < 1e-6


def test_default_distribution_is_nn_linear():
    torch.manual_seed(0)
    par = ParallelFeedForward(256, 700, bias=True)
    for layer, fan_in in ((par.w1, 256), (par.w2, 700), (par.w3, 256)):
        bound = 1 / fan_in**0.5
        for t in (layer.weight, layer.bias):
            assert t.abs().max() <= bound
            assert t.abs().max() > 0.95 * bound  # spans the range, not a narrower one
        # Uniform on [-b, b] has standard deviation b / sqrt(3).
        assert abs(layer.weight.std().item() / (bound / 3**0.5) - 1) < 0.02


def _autocast_case(rank: int, world: int) -> dict[str, tuple]:
    """bf16 autocast over fp32 weights, with bias: same output dtype as the dense block at every
    world size and mode, values within bf16 rounding of the dense autocast result, fp32 gradients."""
    out = {}
    for mode, options in MODES.items():
        torch.manual_seed(2)
        dense = FeedForward(DIM, HIDDEN, bias=True)
        x = torch.randn(BATCH, SEQ, DIM)
        par = ParallelFeedForward.from_dense(dense, **options)
        xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yd, yp = dense(xd), par(xp)
        yd.float().sum().backward()
        yp.float().sum().backward()
        out[mode] = (
            yp.dtype,
            yd.dtype,
            rel_err(yp, yd),
            xp.grad.dtype,
            rel_err(xp.grad, xd.grad),
            par.w1.weight.grad.dtype,
        )
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_autocast_bf16(world):
    for rank, got in enumerate(run_ranks(world, _autocast_case)):
        for mode, (ydt, want_dt, err, gdt, gerr, wdt) in got.items():
            assert ydt == want_dt == torch.bfloat16, (world, rank, mode, ydt)
            assert gdt == wdt == torch.float32, (world, rank, mode)
            assert err < 2e-2 and gerr < 2e-2, (world, rank, mode, err, gerr)


def _sequence_dim_zero(rank: int, world: int) -> dict[str, float]:
    """Megatron's [seq, batch, dim] layout: sequence_dim=0, in every mode that allows SP."""
    out = {}
    for mode, options in MODES.items():
        options = {k: v for k, v in options.items() if k != "comm_chunks"}
        torch.manual_seed(4)
        dense = FeedForward(DIM, HIDDEN, bias=True)
        x = torch.randn(SEQ, BATCH, DIM)
        ref = dense64(dense)
        x64 = x.double().requires_grad_()
        y64 = ref(x64)
        y64.sum().backward()
        par = ParallelFeedForward.from_dense(dense, sequence_parallel=True, sequence_dim=0, **options)
        g = par.tp.group
        xl = split_sequence(x, g, 0).requires_grad_()
        y = par(xl)
        y.sum().backward()
        out[f"{mode} output"] = rel_err(gather_sequence(y.detach(), g, 0), y64)
        out[f"{mode} input grad"] = rel_err(xl.grad, split_sequence(x64.grad, g, 0))
        out[f"{mode} w2 bias grad"] = rel_err(par.w2.bias.grad, ref.w2.bias.grad)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_dim_zero(world):
    for rank, errs in enumerate(run_ranks(world, _sequence_dim_zero)):
        bad = {k: v for k, v in errs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.float32])
def test_init_crosses_scratch_chunks(monkeypatch, dtype):
    """Shards drawn through many small scratch chunks, any dtype, under a non-CPU default device,
    equal the rows/columns of nn.Linear; the generator ends where nn.Linear leaves it."""
    import tp_ffn.init as init

    monkeypatch.setattr(init, "_CHUNK", 37)
    torch.manual_seed(7)
    full = torch.nn.Linear(29, 23, dtype=dtype)
    want_state = torch.get_rng_state()
    # One block, and two blocks (a fused gate/up shard: [s, e) of each half), rows and columns.
    cases = ((0, [(5, 17)]), (1, [(4, 21)]), (0, [(0, 23)]), (0, [(2, 6), (13, 19)]), (1, [(0, 3), (14, 20)]))
    for dim, blocks in cases:
        n = sum(e - s for s, e in blocks)
        w = torch.empty((n, 29) if dim == 0 else (23, n), dtype=dtype)
        b = torch.empty(n if dim == 0 else 23, dtype=dtype)
        torch.manual_seed(7)
        with torch.device("meta"):  # scratch buffers must stay on the CPU regardless
            init.init_linear_shard_(w, b, 29, 23, dim=dim, blocks=blocks)
        assert torch.equal(torch.get_rng_state(), want_state)
        want_w = torch.cat([full.weight.narrow(dim, s, e - s) for s, e in blocks], dim)
        want_b = torch.cat([full.bias[s:e] for s, e in blocks]) if dim == 0 else full.bias
        assert torch.equal(w, want_w) and torch.equal(b, want_b), (dim, blocks)
