"""Phi-3's MLP, whose gate and up projections are one fused ``gate_up_proj``, made tensor-parallel.

``Phi3MLP`` computes ``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2, -1)``: the
SwiGLU block with ``gate_up_proj.weight = [w1; w3]`` (``[2I, H]``, the gate rows first) and
``down_proj = w2``. Sharding the fused weight as one block of rows would give rank 0 all of the gate and
rank 1 all of up (Megatron-LM #360, #520); each half is sharded on its own instead, so rank r holds two row
blocks (:func:`gate_up_rows`)::

    gate_up_proj.weight   [2 n_r, H]   rows [s, e) then [I + s, I + e) of the full [2I, H]
    down_proj.weight      [H, n_r]     columns [s, e)              (s, e = shard_bounds(I, W, r))

Parameter names and the checkpoint layout stay Phi-3's: ``state_dict()`` holds this rank's
``gate_up_proj.weight`` under its own key, :func:`~tp_ffn.hf.full_state_dict` gives the full ``[2I, H]`` in
Phi-3's order, and :func:`~tp_ffn.hf.from_pretrained` reads each rank's two blocks out of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..comm import all_gather_along
from ..fused import gate_up_projection, row_parallel_chunked
from ..groups import GroupLike, TPGroup, resolve_group, shard_bounds
from ..init import init_linear_shard_
from ..layers import RowParallelLinear, check_features, check_input
from ..swiglu import get_activation, swiglu_linear
from .mlp import LAYOUTS, BuildOptions, MLPLayout, activation_name, check_full_weights, copy_module_state

__all__ = ["GateUpParallelLinear", "Phi3ParallelMLP", "gate_up_rows"]


def gate_up_rows(intermediate: int, world: int, rank: int) -> list[tuple[int, int]]:
    """The rows ``[start, end)`` of a fused ``[gate; up]`` weight ``[2I, ...]`` that rank ``rank`` of ``world``
    holds, in the order it stores them: its block of the gate half, then the same block of the up half."""
    s, e = shard_bounds(intermediate, world, rank)
    return [(s, e), (intermediate + s, intermediate + e)]


class GateUpParallelLinear(nn.Module):
    """The fused gate/up projection ``[gate; up] [2I, in]``, column-parallel half by half (no bias).

    ``weight [2 n_r, in]`` holds rows :attr:`row_blocks` of the full weight. The block reads it as the
    gate shard ``weight[:n_r]`` and the up shard ``weight[n_r:]``; this module has no forward of its own.
    """

    def __init__(
        self, in_features: int, intermediate: int, *, group: GroupLike = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_features = check_features("in_features", in_features)
        self.intermediate = check_features("intermediate", intermediate)
        self.out_features = 2 * intermediate
        self.tp: TPGroup = resolve_group(group)
        if intermediate < self.tp.size:
            raise ValueError(
                f"intermediate: expected at least one row per rank (>= the tensor-parallel size {self.tp.size}), "
                f"got {intermediate}"
            )
        self.row_blocks = gate_up_rows(intermediate, self.tp.size, self.tp.rank)
        rows = sum(b - a for a, b in self.row_blocks)
        self.weight = nn.Parameter(torch.empty(rows, in_features, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This rank's rows of what ``nn.Linear(in, 2I, bias=False)`` would draw: each half is the next
        ``I x in`` draws of the stream, so two shard draws over a half each give the dense layer's rows."""
        n = self.weight.shape[0] // 2
        s, e = self.row_blocks[0]
        for half in (self.weight[:n], self.weight[n:]):
            init_linear_shard_(half, None, self.in_features, self.intermediate, dim=0, start=s, end=e)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
            f"rows={self.row_blocks} rank={self.tp.rank}/{self.tp.size}"
        )


class Phi3ParallelMLP(nn.Module):
    """Phi-3's MLP over a tensor-parallel group (see the module docstring for what rank r holds).

    ``x [*, H] -> [*, H]``; the communication and memory of :class:`~tp_ffn.ParallelFeedForward` (one
    all-reduce forward, one backward), with the same execution modes (``fuse_gate_up``, ``overlap_comm``,
    ``comm_chunks``). No biases (Phi-3 has none) and no sequence parallelism.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, activation: str = "silu", group: GroupLike = None,
        fuse_gate_up: bool = False, overlap_comm: bool = True, comm_chunks: int = 1,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        kw: dict[str, Any] = {"group": group, "dtype": dtype, "device": device}
        # Phi3MLP's order (gate_up_proj, down_proj), so both draw the same random stream.
        self.gate_up_proj = GateUpParallelLinear(hidden_size, intermediate_size, **kw)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, input_is_parallel=True, **kw)
        self.tp = self.gate_up_proj.tp
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        get_activation(activation)  # ValueError listing the choices
        self.activation = activation
        self.fuse_gate_up, self.overlap_comm = bool(fuse_gate_up), bool(overlap_comm)
        self.comm_chunks = check_features("comm_chunks", comm_chunks)

    def forward(self, x: Tensor) -> Tensor:
        w = self.gate_up_proj.weight
        check_input(x, w, self.hidden_size, what="hidden_size")
        n = w.shape[0] // 2
        group = self.tp.group
        g, u = gate_up_projection(x, w[:n], w[n:], None, None, group, fused=self.fuse_gate_up, overlap=self.overlap_comm)
        if self.comm_chunks > 1 and self.tp.size > 1:
            return row_parallel_chunked(g, u, self.down_proj.weight, self.activation, group, self.comm_chunks)
        return self.down_proj.reduce_partial(swiglu_linear(g, u, self.down_proj.weight, self.activation))

    @torch.no_grad()
    def load_dense(self, gate_up: Tensor, down: Tensor, *, device: torch.device | str | None = None) -> None:
        """Take this rank's slices of the full ``gate_up_proj.weight [2I, H]`` and ``down_proj.weight [H, I]``
        (parameters on the ``meta`` device are replaced, on ``device``; others are copied into)."""
        s, e = self.down_proj.start, self.down_proj.end
        slices = {
            (self.gate_up_proj, "weight"): torch.cat([gate_up[a:b] for a, b in self.gate_up_proj.row_blocks]),
            (self.down_proj, "weight"): down[:, s:e],
        }
        for (layer, attr), value in slices.items():
            param: nn.Parameter = getattr(layer, attr)
            if param.device.type == "meta":
                value = value.to(device=device or value.device, dtype=param.dtype, copy=True)
                setattr(layer, attr, nn.Parameter(value, requires_grad=param.requires_grad))
            else:
                param.copy_(value)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """``{"gate_up_proj.weight": [2I, H], "down_proj.weight": [H, I]}`` in Phi-3's layout, the same on
        every rank. Collective."""
        tp, intermediate = self.tp, self.intermediate_size
        local = self.gate_up_proj.weight.detach()
        blocks = [gate_up_rows(intermediate, tp.size, r) for r in range(tp.size)]
        sizes = [sum(b - a for a, b in rows) for rows in blocks]
        gathered = all_gather_along(local, tp.group, 0, sizes)
        full = local.new_empty((2 * intermediate, local.shape[1]))
        offset = 0
        for rows in blocks:
            for a, b in rows:
                full[a:b] = gathered[offset : offset + b - a]
                offset += b - a
        down = all_gather_along(self.down_proj.weight.detach(), tp.group, 1, self.down_proj.shard_sizes)
        return {"gate_up_proj.weight": full, "down_proj.weight": down.clone()}

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


_PROJECTIONS = ("gate_up_proj", "down_proj")


def _is_phi3_mlp(module: nn.Module) -> bool:
    children = module._modules
    return type(module).__name__ == "Phi3MLP" and all(type(children.get(n)) is nn.Linear for n in _PROJECTIONS)


def _prepare_phi3(mlp: nn.Module, config: Any, path: str) -> Callable[[BuildOptions], nn.Module]:
    """Check a ``Phi3MLP`` (``ValueError`` naming what does not fit) and return its builder."""
    check_full_weights(mlp, path, _PROJECTIONS)
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    fused, hidden = gate_up.weight.shape
    if fused % 2:
        raise ValueError(f"{path}.gate_up_proj.weight: expected an even number of rows [gate; up], got {fused}")
    intermediate = fused // 2
    if tuple(down.weight.shape) != (hidden, intermediate):
        raise ValueError(
            f"{path}.down_proj.weight: expected shape {(hidden, intermediate)} (from gate_up_proj), "
            f"got {tuple(down.weight.shape)}"
        )
    for n in _PROJECTIONS:
        if mlp._modules[n].bias is not None:
            raise ValueError(f"{path}.{n}: expected no bias (Phi-3's MLP has none), got one")
    activation = activation_name(mlp, config, path, attr="activation_fn")

    def build(opts: BuildOptions) -> Phi3ParallelMLP:
        weight = gate_up.weight
        block = Phi3ParallelMLP(
            hidden, intermediate, activation=activation, group=opts.group, fuse_gate_up=opts.fuse_gate_up,
            overlap_comm=opts.overlap_comm, comm_chunks=opts.comm_chunks, dtype=weight.dtype, device="meta",
        )  # fmt: skip
        if weight.device.type != "meta":
            block.load_dense(weight, down.weight, device=weight.device)
        copy_module_state(mlp, block, _PROJECTIONS)
        return block

    return build


LAYOUTS.append(
    MLPLayout(
        projections="gate_up_proj = [gate; up] fused, down_proj (Phi3MLP, no biases)",
        families="Phi-3 (Phi-3 mini / medium, Phi-3.5 mini)",
        parallel_class=Phi3ParallelMLP,
        matches=_is_phi3_mlp,
        prepare=_prepare_phi3,
    )
)
