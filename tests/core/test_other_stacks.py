"""ParallelFeedForward inside a model whose other layers PyTorch's ``parallelize_module`` shards (the
torchtitan way): the FFN is left out of the plan; at its boundary a DTensor comes in and a plain tensor
or a DTensor goes out. docs/api.md's "Other stacks" section shows this code.

Held against the dense float64 block at W=2 and W=3 (intermediate 37: uneven), without and with sequence
parallelism: output, input gradient and every parameter gradient to 1e-12, and full_state_dict bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.rankpool import run_ranks
from support.reference import rel_err
from torch import nn

from tp_ffn import FeedForward, ParallelFeedForward, shard_bounds, split_sequence
from tp_ffn.diagnostics import count_collectives

DIM, HEADS, HIDDEN = 24, 6, 37


class Attention(nn.Module):
    """Causal self-attention; ``-1`` in the views, so a column-parallel wq/wk/wv gives local heads."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = nn.RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = nn.RMSNorm(DIM), FeedForward(DIM, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


def parallelize(block: Block, mesh, sequence_parallel: bool, dtensor_residual: bool) -> None:
    """docs/api.md's example: attention and norms by a parallelize_module plan, the FFN by tp_ffn."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # Not in the plan: tp_ffn shards the FFN itself (each rank copies its slices of the dense weights).
    block.feed_forward = ParallelFeedForward.from_dense(
        block.feed_forward, group=mesh.get_group(), sequence_parallel=sequence_parallel
    )
    plan = {f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
    if not sequence_parallel:  # plain replicated tensors in and out of the FFN: nothing to convert
        plan["attention.wo"] = RowwiseParallel()
    else:
        plan |= {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=not dtensor_residual),
            "ffn_norm": SequenceParallel(),
        }
        if dtensor_residual:  # the residual stream is a DTensor: local shard in, DTensor out
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_input=True,
                output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=False,
            )  # fmt: skip
        else:  # torchtitan: the norm hands over a DTensor, the residual stream is plain local shards
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
            )
    parallelize_module(block, mesh, plan)


def _run(rank: int, world: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import tp_ffn.hf

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    dense = Block().double()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)  # sequence 6 splits over 2 and 3 ranks
    xd = x.clone().requires_grad_()
    want = dense(xd)
    want.square().sum().backward()
    s, e = shard_bounds(HIDDEN, world, rank)
    out = {}
    for name, sp, dtr in (("plain", False, False), ("torchtitan SP", True, False), ("DTensor residual", True, True)):
        block = copy.deepcopy(dense)
        block.zero_grad()
        parallelize(block, mesh, sp, dtr)
        local = split_sequence(x, mesh.get_group()) if sp else x
        xp = local.clone().requires_grad_()
        y = block(DTensor.from_local(xp, mesh, [Shard(1)]) if dtr else xp)
        y = y.to_local() if dtr else y
        y.square().sum().backward()  # each rank's loss is its own tokens' (SP) or the whole (replicated) sum
        if sp:
            out[f"{name} output"] = rel_err(y, split_sequence(want, mesh.get_group()))
            out[f"{name} input grad"] = rel_err(xp.grad, split_sequence(xd.grad, mesh.get_group()))
        else:
            out[f"{name} output"] = rel_err(y, want)
            out[f"{name} input grad"] = rel_err(xp.grad, xd.grad)
        grads = dict(block.named_parameters())
        for key, p in dense.named_parameters():
            g = grads[key].grad
            g = g.full_tensor() if isinstance(g, DTensor) else g
            ref = p.grad[s:e] if key in ("feed_forward.w1.weight", "feed_forward.w3.weight") else p.grad
            ref = p.grad[:, s:e] if key == "feed_forward.w2.weight" else ref
            out[f"{name} grad {key}"] = rel_err(g, ref)
        full, sd = tp_ffn.hf.full_state_dict(block), dense.state_dict()
        out[f"{name} full_state_dict"] = 0.0 if all(torch.equal(full[k], v) for k, v in sd.items()) else 1.0
        with torch.no_grad():
            normed = block.ffn_norm(DTensor.from_local(local, mesh, [Shard(1)]) if dtr else local)
            with count_collectives() as n:
                block.feed_forward(normed)
        out[f"{name} FFN collectives"] = dict(n)
    return out


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_ffn_beside_a_parallelize_module_plan(world):
    for rank, got in enumerate(run_ranks(world, _run, timeout=180)):
        # The boundary adds no communication: the FFN's own, as without the plan.
        assert got.pop("plain FFN collectives") == {"all_reduce": 1}, (rank, got)
        for name in ("torchtitan SP", "DTensor residual"):
            # The reduce-scatter is an all-to-all and a sum on gloo (tp_ffn.comm._sums_by_all_to_all).
            assert got.pop(f"{name} FFN collectives") == {"all_gather": 1, "all_to_all": 1}, (rank, name)
        bad = {k: v for k, v in got.items() if not v < 1e-12}
        assert not bad, f"W={world} rank {rank}: {bad}"
