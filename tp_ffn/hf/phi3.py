"""Phi-3's MLP, whose gate and up projections are one fused ``gate_up_proj``, made tensor-parallel.

``Phi3MLP`` computes ``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2, -1)``: the
SwiGLU block with ``gate_up_proj.weight = [w1; w3]`` (``[2I, H]``, the gate rows first) and
``down_proj = w2``. Sharding the fused weight as one block of rows would give rank 0 all of the gate and
rank 1 all of up (Megatron-LM #360, #520); each half is sharded on its own instead, so rank r holds two row
blocks, the two parts of ``ColumnParallelLinear(H, 2I, parts=(I, I))`` (:func:`gate_up_rows`)::

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

from ..fused import gate_up_projection, row_parallel_chunked
from ..groups import GroupLike, TPGroup
from ..layers import ColumnParallelLinear, RowParallelLinear, check_features, check_input
from ..sharding import ShardSpec, shard_spec_of
from ..swiglu import get_activation, swiglu_linear
from .mlp import LAYOUTS, BuildOptions, MLPLayout, activation_name, check_full_weights, copy_module_state

__all__ = ["Phi3ParallelMLP", "gate_up_rows"]


def gate_up_rows(intermediate: int, world: int, rank: int) -> list[tuple[int, int]]:
    """The rows ``[start, end)`` of a fused ``[gate; up]`` weight ``[2I, ...]`` that rank ``rank`` of ``world``
    holds, in the order it stores them: its block of the gate half, then the same block of the up half (the
    blocks of ``ColumnParallelLinear(..., parts=(I, I))``'s spec)."""
    return list(ShardSpec.split((2 * intermediate,), 0, rank, world, (intermediate, intermediate)).blocks)


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
        # Phi3MLP's order (gate_up_proj, down_proj), so both draw the same random stream. The fused weight is
        # two parts (gate, up), each sharded on its own: rank r holds rows [s, e) and [I + s, I + e), so its
        # local weight is its gate shard then its up shard (one block of rows would give rank 0 all the gate).
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, 2 * intermediate_size, bias=False, gather_output=False,
            parts=(intermediate_size, intermediate_size), **kw,
        )  # fmt: skip
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, input_is_parallel=True, **kw)
        self.tp: TPGroup = self.gate_up_proj.tp
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
        """Take this rank's slices (what each layer's shard spec says) of the full ``gate_up_proj.weight
        [2I, H]`` and ``down_proj.weight [H, I]`` (parameters on the ``meta`` device are replaced, on
        ``device``; others are copied into)."""
        for layer, full in ((self.gate_up_proj, gate_up), (self.down_proj, down)):
            param: nn.Parameter = layer.weight
            value = shard_spec_of(layer, "weight").take(full, name=f"{type(layer).__name__}.weight")
            if param.device.type == "meta":
                value = value.to(device=device or value.device, dtype=param.dtype, copy=True)
                layer.weight = nn.Parameter(value, requires_grad=param.requires_grad)
            else:
                param.copy_(value)

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
