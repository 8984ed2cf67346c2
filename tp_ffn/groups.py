"""Resolve the tensor-parallel group argument.

Every layer takes ``group`` as a ``ProcessGroup``, a 1-D ``DeviceMesh`` or ``None``; this module
turns that into a :class:`TPGroup` once, at construction, so that no layer consults global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch.distributed as dist
from torch.distributed import ProcessGroup

from .sharding import shard_bounds, shard_sizes  # their home; re-exported here for older imports

try:  # DeviceMesh lives in torch.distributed.device_mesh from torch 2.2 on.
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - very old torch
    DeviceMesh = ()  # type: ignore[assignment,misc]

__all__ = ["GroupLike", "TPGroup", "resolve_group", "shard_bounds", "shard_sizes"]

GroupLike = Union[ProcessGroup, "DeviceMesh", None]


@dataclass(frozen=True)
class TPGroup:
    """A resolved tensor-parallel group.

    ``group`` is ``None`` only when no process group is initialised (a single process, e.g. a
    notebook); then ``rank == 0`` and ``size == 1`` and every collective is skipped.

    ``copy.copy`` and ``copy.deepcopy`` return the object itself: a copied module (``deepcopy``,
    ``torch.optim.swa_utils.AveragedModel``) works on the same group, which cannot be copied anyway.
    Pickling is unchanged (it fails for a live ``ProcessGroup``, as it always did).
    """

    group: ProcessGroup | None
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TPGroup: expected 0 <= rank < size, got rank={self.rank}, size={self.size}")

    def __copy__(self) -> TPGroup:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TPGroup:
        # A ProcessGroup cannot be copied (nor pickled); a deep-copied module talks over the same group.
        return self


def resolve_group(group: GroupLike) -> TPGroup:
    """Turn ``group`` (ProcessGroup, 1-D DeviceMesh or None) into a :class:`TPGroup`.

    ``None`` means the default (world) group when one is initialised, else a world of one.
    Raises ``ValueError`` when this rank is not a member of the group, ``TypeError`` for other
    kinds of argument.
    """
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group: expected a 1-D DeviceMesh (e.g. mesh['tp']), got a {group.ndim}-D mesh "
                f"with dims {group.mesh_dim_names} and shape {tuple(group.shape)}"
            )
        group = group.get_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return TPGroup(None, 0, 1)
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        # dist.new_group hands this sentinel to ranks outside the group.
        raise ValueError(
            f"group: expected a process group that contains this rank, but global rank "
            f"{dist.get_rank()} is not a member of it"
        )
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"group: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"group: expected a process group that contains this rank, but global rank "
            f"{dist.get_rank()} is not a member of it"
        )
    return TPGroup(group, rank, dist.get_world_size(group))
