"""ColumnParallelLinear and RowParallelLinear on their own against nn.Linear (float64 reference)."""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import ColumnParallelLinear, RowParallelLinear, gather_sequence, split_sequence

IN, OUT = 13, 11  # uneven over 2, 3 and 4 ranks


def _linear_case(kind: str, bias: bool) -> dict[str, float]:
    torch.manual_seed(5)
    dense = torch.nn.Linear(IN, OUT, bias=bias)
    torch.manual_seed(5)
    if kind == "column":
        par = ColumnParallelLinear(IN, OUT, bias, gather_output=True)
    else:
        par = RowParallelLinear(IN, OUT, bias, input_is_parallel=False)
    x = torch.randn(2, 4, IN)
    gy = torch.randn(2, 4, OUT)
    ref = torch.nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in dense.state_dict().items()})
    x64 = x.double().requires_grad_()
    ref(x64).backward(gy.double())

    xl = x.clone().requires_grad_()
    y = par(xl)
    y.backward(gy)
    s, e = par.start, par.end
    if kind == "column":
        w_ref, wg_ref = dense.weight[s:e], ref.weight.grad[s:e]
        b_ref = None if not bias else (dense.bias[s:e], ref.bias.grad[s:e])
    else:
        w_ref, wg_ref = dense.weight[:, s:e], ref.weight.grad[:, s:e]
        b_ref = None if not bias else (dense.bias, ref.bias.grad)
    m = {
        "init": rel_err(par.weight, w_ref),
        "output": rel_err(y, ref(x64)),
        "input_grad": rel_err(xl.grad, x64.grad),
        "weight_grad": rel_err(par.weight.grad, wg_ref),
    }
    if b_ref:
        m["bias init"] = rel_err(par.bias, b_ref[0])
        m["bias_grad"] = rel_err(par.bias.grad, b_ref[1])
    return m


def _sp_pair_case(bias: bool) -> dict[str, float]:
    """Column(SP) -> Row(SP): the sequence-parallel pair against two nn.Linear."""
    torch.manual_seed(6)
    a = torch.nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    b = torch.nn.Linear(OUT, IN, bias=bias, dtype=torch.float64)
    torch.manual_seed(6)
    col = ColumnParallelLinear(IN, OUT, bias, gather_output=False, sequence_parallel=True, dtype=torch.float64)
    row = RowParallelLinear(OUT, IN, bias, input_is_parallel=True, sequence_parallel=True, dtype=torch.float64)
    g = col.tp.group
    world = col.tp.size
    x = torch.randn(3, 2 * world, IN, dtype=torch.float64, requires_grad=True)
    y_ref = b(torch.relu(a(x)))
    y_ref.backward(torch.ones_like(y_ref))
    xl = split_sequence(x.detach(), g).requires_grad_()
    y = row(torch.relu(col(xl)))
    y.backward(torch.ones_like(y))
    m = {
        "output": rel_err(gather_sequence(y.detach(), g), y_ref),
        "input_grad": rel_err(xl.grad, split_sequence(x.grad, g)),
        "col weight_grad": rel_err(col.weight.grad, a.weight.grad[col.start : col.end]),
        "row weight_grad": rel_err(row.weight.grad, b.weight.grad[:, row.start : row.end]),
    }
    if bias:
        m["row bias_grad (whole, every rank)"] = rel_err(row.bias.grad, b.bias.grad)
    return m


def _layers(rank: int, world: int) -> dict:
    out = {}
    for kind in ("column", "row"):
        for bias in (False, True):
            out[(kind, bias)] = _linear_case(kind, bias)
    for bias in (False, True):
        out[("sp pair", bias)] = _sp_pair_case(bias)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layers_match_nn_linear(world):
    for rank, got in enumerate(run_ranks(world, _layers)):
        for case, metrics in got.items():
            bad = {k: v for k, v in metrics.items() if v > (0 if k.endswith("init") else 1e-5)}
            assert not bad, f"W={world} rank {rank} {case}: {bad}"


def _uneven_gather_shapes(rank: int, world: int) -> list[tuple[int, ...]]:
    col = ColumnParallelLinear(IN, OUT, gather_output=True)
    return [tuple(col.weight.shape), tuple(col(torch.randn(5, IN)).shape)]


@pytest.mark.timeout(60)
def test_gather_output_with_uneven_shards():
    shapes = run_ranks(3, _uneven_gather_shapes)
    assert [s[0] for s in shapes] == [(4, IN), (4, IN), (3, IN)]  # 11 over 3: 4, 4, 3
    assert all(s[1] == (5, OUT) for s in shapes)


def test_invalid_combinations():
    with pytest.raises(ValueError, match="input_is_parallel"):
        RowParallelLinear(4, 4, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match="in_features"):
        ColumnParallelLinear(0, 4)
    with pytest.raises(TypeError, match="out_features"):
        RowParallelLinear(4, 4.0)
    row = RowParallelLinear(6, 4, input_is_parallel=True)
    with pytest.raises(ValueError, match=r"x: expected last dimension 6"):
        row(torch.randn(2, 5))


def _column_sp_autocast(rank: int, world: int) -> dict:
    """ColumnParallelLinear with sequence parallelism under bf16 autocast, against the composition it
    ran before (all-gather the fp32 input, then F.linear casts it): output and gradients bit for bit,
    and the bytes of each collective."""
    from torch.nn import functional as F

    from tp_ffn import gather_from_sequence
    from tp_ffn.diagnostics import record_collectives

    torch.manual_seed(8)
    col = ColumnParallelLinear(IN, OUT, True, gather_output=False, sequence_parallel=True)
    group = col.tp.group
    x = split_sequence(torch.randn(2, 3 * world, IN), group)
    gy = torch.randn(2, 3 * world, col.weight.shape[0]).bfloat16()
    xl = x.clone().requires_grad_()
    with record_collectives() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        y = col(xl)
        y.backward(gy)
    got = [y.detach(), xl.grad, col.weight.grad, col.bias.grad]
    col.zero_grad()
    x0 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = F.linear(gather_from_sequence(x0, group), col.weight, col.bias)
        y0.backward(gy)
    before = [y0.detach(), x0.grad, col.weight.grad, col.bias.grad]
    x64 = x.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast's: no cast, no bf16
        y64 = col.double()(x64)
    return {
        "same": [torch.equal(a, b) for a, b in zip(got, before)],
        "dtypes": (y.dtype, xl.grad.dtype),
        "calls": [(c.kind, c.dtype, c.nbytes) for c in calls],
        "float64 stays": y64.dtype,
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_column_parallel_sequence_gather_carries_the_compute_dtype(world):
    full = 2 * 3 * world * IN
    for rank, got in enumerate(run_ranks(world, _column_sp_autocast)):
        assert all(got["same"]), (world, rank, got["same"])
        assert got["dtypes"] == (torch.bfloat16, torch.float32), (world, rank)
        # Forward: the input gathered in bf16; backward: the input gradient's reduce-scatter (an
        # all-to-all of the other ranks' blocks on gloo) in bf16 too, summed in fp32.
        assert got["calls"] == [
            ("all_gather", torch.bfloat16, 2 * full),
            ("all_to_all", torch.bfloat16, 2 * full * (world - 1) // world),
        ], got["calls"]
        assert got["float64 stays"] == torch.float64
