"""ParallelFeedForward against fairscale 0.4.13, the reference for Meta's tensor-parallel layout.

Meta's Llama code builds its feed-forward block from fairscale's ``ColumnParallelLinear`` (w1 and w3,
``gather_output=False``) and ``RowParallelLinear`` (w2, ``input_is_parallel=True``) and computes
``w2(silu(w1(x)) * w3(x))``. Both blocks run here on the same gloo group (2 and 4 ranks) with the
same shards, which were cut by ``ParallelFeedForward.from_dense``; fairscale's own
``get_master_weight`` (its all-gather and concatenation order) must put them back into the dense
weights, so our rank r holds exactly the block fairscale expects on rank r.

fairscale on CPU: ``initialize_model_parallel`` only calls ``torch.distributed.new_group`` (the
pool's default backend, gloo) and the layers' forward and backward use only all-reduce and
all-gather, so they run unmodified. Its RNG helpers are CUDA-only: ``model_parallel_cuda_manual_seed``
silently does nothing without CUDA, and ``get_cuda_rng_tracker().add`` records the seed and then
raises "Torch not compiled with CUDA enabled" (a retry in the same process says "seed ... already
exists"). The layers are therefore built with ``init_method=lambda w: w`` (no random draw), their
weights are overwritten with the shards, and no seed function is called. fairscale keeps its groups
in module globals, so every rank function ends with ``destroy_model_parallel()`` to leave the pooled
process ready for the next call. fairscale also requires the hidden size to be divisible by the
world size (it asserts), hence hidden 96 and 128 here; uneven shards are covered by
test_ffn_parallel.py.

Tolerances: fp32 blocks with dim 32, hidden <= 128 and ten tokens; both are a handful of fp32 ulps
(~1e-7 relative) from each other and from the float64 dense reference, so 1e-5 leaves two orders of
margin. The negative controls (one rank's w3 shard scaled by 1 + 1e-3, and w2's shards handed to the
wrong ranks) must move fairscale's output by more than 10x that tolerance.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from support.rankpool import run_ranks
from support.reference import dense64, rel_err
from torch import nn

from tp_ffn import FeedForward, ParallelFeedForward

DIM, BATCH, SEQ = 32, 2, 5
HIDDENS = (96, 128)  # divisible by 2 and 4, as fairscale requires
TOL = 1e-5
CONTROL_MIN = 10 * TOL


class _MetaFeedForward(nn.Module):
    """Meta's Llama ``FeedForward`` on fairscale's model-parallel layers (optionally with biases)."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden, bias=bias, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden, dim, bias=bias, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden, bias=bias, gather_output=False, init_method=lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@torch.no_grad()
def _load(theirs: _MetaFeedForward, ours: ParallelFeedForward) -> None:
    for name in ("w1", "w2", "w3"):
        src, dst = getattr(ours, name), getattr(theirs, name)
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


def _forward_backward(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad


def _one_case(rank: int, world: int, hidden: int, bias: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(errors, controls) for one shape on this rank; fairscale's groups must be initialised."""
    torch.manual_seed(2024 + hidden + bias)
    dense = FeedForward(DIM, hidden, bias=bias)
    x = torch.randn(BATCH, SEQ, DIM)
    gy = torch.randn(BATCH, SEQ, DIM)
    ref = dense64(dense)
    y64, gx64 = _forward_backward(ref, x.double(), gy.double())

    ours = ParallelFeedForward.from_dense(dense)
    theirs = _MetaFeedForward(DIM, hidden, bias)
    _load(theirs, ours)
    y_ours, gx_ours = _forward_backward(ours, x, gy)
    y_fs, gx_fs = _forward_backward(theirs, x, gy)

    err = {
        "ours vs fairscale output": rel_err(y_ours, y_fs),
        "ours vs fairscale input grad": rel_err(gx_ours, gx_fs),
        "ours vs dense64 output": rel_err(y_ours, y64),
        "ours vs dense64 input grad": rel_err(gx_ours, gx64),
        "fairscale vs dense64 output": rel_err(y_fs, y64),
        "fairscale vs dense64 input grad": rel_err(gx_fs, gx64),
    }
    for name in ("w1", "w2", "w3"):
        for attr in ("weight", "bias") if bias else ("weight",):
            mine, other = getattr(getattr(ours, name), attr), getattr(getattr(theirs, name), attr)
            err[f"ours vs fairscale {name}.{attr} grad"] = rel_err(mine.grad, other.grad)
    # Layout: fairscale's own gather of our shards must give back the dense weights bit for bit.
    for name in ("w1", "w2", "w3"):
        master = getattr(theirs, name).get_master_weight()
        err[f"layout {name} (fairscale master weight vs dense)"] = rel_err(master, getattr(dense, name).weight)

    controls = {}
    with torch.no_grad():
        # One rank's w3 shard off by 1e-3 relative: a small, local mistake must be seen on every rank.
        saved = theirs.w3.weight.clone()
        if rank == 0:
            theirs.w3.weight.mul_(1 + 1e-3)
        controls["one w3 shard scaled by 1+1e-3"] = rel_err(theirs(x), y_ours)
        theirs.w3.weight.copy_(saved)
        # w2's column blocks handed to the wrong ranks (all blocks have the same size here).
        width, nxt = ours.w2.end - ours.w2.start, ours.w2.end % hidden
        theirs.w2.weight.copy_(dense.w2.weight[:, nxt : nxt + width])
        controls["w2 shards rotated by one rank"] = rel_err(theirs(x), y_ours)
        controls["layout check sees the rotation"] = rel_err(theirs.w2.get_master_weight(), dense.w2.weight)
    return err, controls


def _against_fairscale(rank: int, world: int) -> dict[tuple[int, bool], tuple[dict[str, float], dict[str, float]]]:
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on rank 0
        fs_init.initialize_model_parallel(world)
    try:
        assert fs_init.get_model_parallel_world_size() == world
        assert fs_init.get_model_parallel_rank() == rank
        return {(hidden, bias): _one_case(rank, world, hidden, bias) for hidden in HIDDENS for bias in (False, True)}
    finally:
        fs_init.destroy_model_parallel()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_matches_fairscale_meta_layout(world):
    per_rank = run_ranks(world, _against_fairscale)
    failures = []
    for case in per_rank[0]:
        for name in per_rank[0][case][0]:
            err = max(r[case][0][name] for r in per_rank)
            tol = 0.0 if name.startswith("layout") else TOL
            if err > tol:
                failures.append(f"hidden={case[0]} bias={case[1]}: {name} rel err {err:.2e} > {tol}")
        for name in per_rank[0][case][1]:
            seen = min(r[case][1][name] for r in per_rank)
            if seen < CONTROL_MIN:
                failures.append(f"hidden={case[0]} bias={case[1]}: control {name!r} not detected (rel err {seen:.2e})")
    assert not failures, "\n".join(failures)


def _uneven(rank: int, world: int, hidden: int) -> tuple[str, list[int]]:
    with contextlib.redirect_stdout(io.StringIO()):
        fs_init.initialize_model_parallel(world)
    try:
        try:
            ColumnParallelLinear(DIM, hidden, bias=False, gather_output=False, init_method=lambda x: x)
            refused = ""
        except AssertionError as e:
            refused = str(e)
        torch.manual_seed(0)
        ours = ParallelFeedForward.from_dense(FeedForward(DIM, hidden))
        return refused, list(ours.w1.shard_sizes)
    finally:
        fs_init.destroy_model_parallel()


@pytest.mark.timeout(120)
def test_fairscale_refuses_uneven_hidden_where_ours_shards_it():
    """Why the comparison uses divisible hidden sizes: fairscale asserts, tp_ffn splits like tensor_split."""
    for refused, sizes in run_ranks(2, _uneven, 101):
        assert refused == "101 is not divisible by 2"
        assert sizes == [51, 50]
