"""Bad input gets a ValueError/TypeError naming the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from support.rankpool import run_ranks

from tp_ffn import (
    FeedForward,
    ParallelFeedForward,
    RowParallelLinear,
    llama_ffn_hidden_dim,
    reduce_scatter_to_sequence,
    resolve_group,
    split_sequence,
)


@pytest.mark.parametrize("cls", [FeedForward, ParallelFeedForward])
def test_input_checks(cls):
    ffn = cls(8, 12)
    with pytest.raises(ValueError, match=r"x: expected last dimension 8 \(dim\), got shape \(2, 3, 7\)"):
        ffn(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"x: expected last dimension 8"):
        ffn(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 .*got torch.float64"):
        ffn(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: expected a tensor on cpu .*got one on meta"):
        ffn(torch.empty(2, 8, device="meta"))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        ffn([[0.0] * 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ffn(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_constructor_checks():
    with pytest.raises(ValueError, match="activation: expected one of .*got 'swish'"):
        ParallelFeedForward(8, 12, activation="swish")
    with pytest.raises(ValueError, match="hidden_dim: expected an int >= 1, got 0"):
        FeedForward(8, 0)
    with pytest.raises(TypeError, match="dim: expected an int, got float"):
        ParallelFeedForward(8.0, 12)
    with pytest.raises(TypeError, match="group: expected a ProcessGroup"):
        ParallelFeedForward(8, 12, group="tp")


def test_hidden_dim_rule():
    assert llama_ffn_hidden_dim(4096) == 11008
    assert llama_ffn_hidden_dim(5120) == 13824
    assert llama_ffn_hidden_dim(8192, ffn_dim_multiplier=1.3, multiple_of=4096) == 28672
    assert llama_ffn_hidden_dim(4096, ffn_dim_multiplier=1.3, multiple_of=1024) == 14336
    assert llama_ffn_hidden_dim(16384, ffn_dim_multiplier=1.2, multiple_of=4096) == 53248
    # Both truncations matter: 2*1000/3 = 666.67 -> 666; 1.5*666 = 999 -> round up to 1000.
    assert llama_ffn_hidden_dim(250, multiple_of=1) == 666
    assert llama_ffn_hidden_dim(250, multiple_of=1, ffn_dim_multiplier=1.5) == 999
    assert llama_ffn_hidden_dim(64, hidden_dim=96, multiple_of=32) == 64
    with pytest.raises(ValueError, match="ffn_dim_multiplier"):
        llama_ffn_hidden_dim(64, ffn_dim_multiplier=0)
    with pytest.raises(ValueError, match="multiple_of"):
        llama_ffn_hidden_dim(64, multiple_of=0)


def _distributed_errors(rank: int, world: int) -> dict[str, str]:
    caught = {}

    def expect(name, exc, fn):
        try:
            fn()
        except exc as e:
            caught[name] = str(e)
        else:
            caught[name] = "NO ERROR"

    expect("split_sequence", ValueError, lambda: split_sequence(torch.randn(2, 5, 4), dist.group.WORLD))
    expect("reduce_scatter", ValueError, lambda: reduce_scatter_to_sequence(torch.randn(2, 5, 4), dist.group.WORLD))
    row = RowParallelLinear(6, 4, input_is_parallel=True, sequence_parallel=True)
    expect("sp row", ValueError, lambda: row(torch.randn(2, 3, row.weight.shape[1])))
    expect("hidden < world", ValueError, lambda: ParallelFeedForward(4, world - 1))
    sp_ffn = ParallelFeedForward(4, 8, sequence_parallel=True)
    expect("sp 2-D x", ValueError, lambda: sp_ffn(torch.randn(3, 4)))
    expect("sp dim", TypeError, lambda: ParallelFeedForward(4, 8, sequence_parallel=True, sequence_dim=1.0))
    sub = dist.new_group([0])  # every rank must call new_group; rank 1 is outside
    if rank == 1:
        expect("non-member", ValueError, lambda: ParallelFeedForward(4, 8, group=sub))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    caught["mesh size"] = str(resolve_group(mesh).size)
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    expect("2-D mesh", ValueError, lambda: ParallelFeedForward(4, 8, group=mesh2))
    caught["mesh2['tp'] size"] = str(ParallelFeedForward(4, 8, group=mesh2["tp"]).tp.size)
    return caught


@pytest.mark.timeout(60)
def test_distributed_errors():
    for rank, caught in enumerate(run_ranks(2, _distributed_errors)):
        assert (
            "sequence length (dim 1) to be divisible by the tensor-parallel size 2, got length 5"
            in caught["split_sequence"]
        )
        assert "got length 5" in caught["reduce_scatter"]
        assert "got length 3" in caught["sp row"]
        assert (
            "hidden_dim: expected at least one row per rank (>= the tensor-parallel size 2), got 1"
            in caught["hidden < world"]
        )
        if rank == 1:
            assert "global rank 1 is not a member" in caught["non-member"]
        assert "x: sequence parallelism needs a sequence dimension 1 other than the last" in caught["sp 2-D x"]
        assert "sequence_dim: expected an int, got float" in caught["sp dim"]
        assert caught["mesh size"] == "2"
        assert "expected a 1-D DeviceMesh" in caught["2-D mesh"] and "('dp', 'tp')" in caught["2-D mesh"]
        assert caught["mesh2['tp'] size"] == "2"
