"""Where each rank's piece of every parameter sits in the full (unsharded) model.

A parameter is cut twice:

* by tensor parallelism, as the layer holding it says (its :class:`~tp_ffn.sharding.ShardSpec`:
  ``torch.tensor_split`` blocks along ``ColumnParallelLinear``'s weight rows and bias,
  ``RowParallelLinear``'s weight columns), or not at all (embeddings, norms, a row-parallel bias):
  replicated over the TP group;
* by FSDP2 over the dp group, into ``torch.chunk`` pieces along dim 0 of the TP block (the last
  ranks may hold fewer rows, or none).

So rank (d, t) holds one rectangular block of the full tensor, e.g. for ``w2 [dim, hidden]``
(row-parallel, hidden split over TP) at tp=2, dp=2::

                 hidden cols [0, h0)        [h0, hidden)
    dim rows [0, c)         (d=0, t=0)        (d=0, t=1)
    dim rows [c, dim)       (d=1, t=0)        (d=1, t=1)

:func:`param_blocks` describes those blocks with their true global offsets (the TP spec's
:meth:`~tp_ffn.sharding.ShardSpec.boxes` of the FSDP piece); the checkpoint and the global gradient
norm are built on it. (DTensor's own ``Shard`` placement would describe the TP split with
``torch.chunk`` sizes, which differ from ``tensor_split``'s when the size does not divide: 10 over 4
is 3, 3, 3, 1 versus 3, 3, 2, 2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ...sharding import chunk_bounds, shard_spec_of

__all__ = ["Block", "chunk_bounds", "local_tensor", "param_blocks"]


@dataclass(frozen=True)
class Block:
    """This rank's piece of one tensor: ``full[offsets[i] : offsets[i] + sizes[i]]`` on every dim."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tp_sharded: bool  # False: the same block is on every rank of the TP group

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def is_full(self) -> bool:
        return self.sizes == self.global_shape


def local_tensor(t: Tensor) -> Tensor:
    """The tensor this rank holds (the local shard of an FSDP2 DTensor, else ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _fsdp_offset(p: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offset and size of this rank's FSDP2 piece inside the TP block ``p`` describes."""
    shape = tuple(p.shape)
    if not isinstance(p, DTensor):
        return (0,) * len(shape), shape
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(f"expected FSDP2's Shard(0) on a 1-D mesh, got {placements} on {mesh}")
    start, end = chunk_bounds(shape[0], mesh.size(), mesh.get_local_rank())
    sizes = (end - start, *shape[1:])
    if tuple(p.to_local().shape) != sizes:
        raise AssertionError(f"FSDP2 local shard {tuple(p.to_local().shape)} is not torch.chunk's {sizes}")
    return (start,) + (0,) * (len(shape) - 1), sizes


def param_blocks(model: nn.Module) -> dict[str, Block]:
    """``{fully qualified name: Block}`` for every parameter of ``model`` (FSDP2-wrapped or not)."""
    out: dict[str, Block] = {}
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            fqn = f"{mod_name}.{name}" if mod_name else name
            spec = shard_spec_of(module, name, p)  # p.shape is the TP block's even under FSDP2
            boxes = spec.boxes(*_fsdp_offset(p))
            if len(boxes) != 1:
                raise NotImplementedError(
                    f"{fqn}: this rank's piece is {len(boxes)} blocks of the full tensor ({spec}); the DCP layout "
                    "writes one block per rank"
                )
            offsets, sizes, _ = boxes[0]
            out[fqn] = Block(spec.shape, offsets, sizes, spec.is_sharded)
    return out
