"""fairscale's model-, data- and pipeline-parallel groups, kept in this module (fairscale's API).

This is the one place in tp_ffn with module-level process-group state: fairscale's API is global
(``initialize_model_parallel(n)`` once, then ``get_model_parallel_group()`` anywhere), and code
written against it -- Meta's Llama ``model.py`` and ``generation.py`` -- calls it that way. The
layers of this package read the group once, at construction, and hand it to the core layers,
which take it explicitly like everything else in tp_ffn.

Rank layout, as in fairscale 0.4.13: the world is ``arange(world).reshape(dp, pp, mp)``. With 8
ranks, ``model_parallel_size=2`` and ``pipeline_length=1``::

    model-parallel groups  [0, 1] [2, 3] [4, 5] [6, 7]   (contiguous ranks: one per node's neighbours)
    data-parallel groups   [0, 2, 4, 6] [1, 3, 5, 7]
    pipeline groups        [0] [1] ... [7]

With ``model_parallel_size=2, pipeline_length=2``: model ``[0, 1] [2, 3] [4, 5] [6, 7]``, pipeline
``[0, 2] [1, 3] [4, 6] [5, 7]``, data ``[0, 4] [1, 5] [2, 6] [3, 7]``.

Differences from fairscale: misuse raises ``RuntimeError`` / ``ValueError`` with the numbers instead
of a bare ``assert``, and nothing is printed. ``destroy_model_parallel`` forgets the groups as
fairscale does (it does not destroy them: layers built before keep working).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "destroy_model_parallel",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_model_parallel_group",
    "get_model_parallel_rank",
    "get_model_parallel_src_rank",
    "get_model_parallel_world_size",
    "get_pipeline_parallel_group",
    "get_pipeline_parallel_ranks",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
]


@dataclass(frozen=True)
class _Groups:
    model: ProcessGroup
    data: ProcessGroup
    pipeline: ProcessGroup
    pipeline_ranks: list[int]


_groups: _Groups | None = None


def _rank_grid(world: int, model_parallel_size: int, pipeline_length: int) -> torch.Tensor:
    """``[dp, pp, mp]`` global ranks; raises ``ValueError`` unless ``mp * pp`` divides ``world``."""
    if world % (model_parallel_size * pipeline_length):
        raise ValueError(
            f"initialize_model_parallel: the world size {world} is not divisible by model_parallel_size "
            f"{model_parallel_size} x pipeline_length {pipeline_length}"
        )
    dp = world // (model_parallel_size * pipeline_length)
    return torch.arange(world).reshape(dp, pipeline_length, model_parallel_size)


def _subgroup(ranks: list[list[int]], backend: str | None) -> ProcessGroup:
    """Create every group of ``ranks`` (a collective over the world) and return this rank's."""
    mine, _ = dist.new_subgroups_by_enumeration(ranks, backend=backend)
    return mine


def initialize_model_parallel(
    model_parallel_size: int | None = None,
    pipeline_length: int = 1,
    *,
    model_parallel_backend: str | None = None,
    pipeline_backend: str | None = None,
    ddp_backend: str | None = None,
    model_parallel_size_: int | None = None,
) -> None:
    """Split the world into model-, data- and pipeline-parallel groups (fairscale's layout, above).

    A collective: every rank of the default group calls it with the same arguments. As in
    fairscale, ``model_parallel_size`` larger than the world is reduced to the world size. The
    ``*_backend`` arguments choose each group's backend (``None``: the default group's).
    Raises ``RuntimeError`` when ``torch.distributed`` is not initialised or the groups already
    are, ``ValueError`` when the sizes do not divide the world. ``model_parallel_size_`` is
    fairscale's own spelling of the first argument, accepted as a keyword for code that uses it.
    """
    global _groups
    if (model_parallel_size is None) == (model_parallel_size_ is None):
        raise TypeError(
            "initialize_model_parallel: expected the model-parallel size once, as model_parallel_size "
            f"(or fairscale's keyword model_parallel_size_), got {model_parallel_size!r} and {model_parallel_size_!r}"
        )
    if model_parallel_size is None:
        model_parallel_size = model_parallel_size_
    for name, value in (("model_parallel_size", model_parallel_size), ("pipeline_length", pipeline_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"initialize_model_parallel: {name}: expected a positive int, got {value!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "initialize_model_parallel: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (e.g. under torchrun) first"
        )
    if _groups is not None:
        raise RuntimeError(
            "initialize_model_parallel: model parallel is already initialised (model-parallel size "
            f"{dist.get_world_size(_groups.model)}); call destroy_model_parallel() first"
        )
    world = dist.get_world_size()
    grid = _rank_grid(world, min(model_parallel_size, world), pipeline_length)
    dp, pp, mp = grid.shape
    # Creation order: data, model, pipeline, as fairscale creates them.
    data = _subgroup([grid[:, j, k].tolist() for j in range(pp) for k in range(mp)], ddp_backend)
    model = _subgroup([grid[i, j, :].tolist() for i in range(dp) for j in range(pp)], model_parallel_backend)
    pipe_ranks = [grid[i, :, k].tolist() for i in range(dp) for k in range(mp)]
    pipeline = _subgroup(pipe_ranks, pipeline_backend)
    rank = dist.get_rank()
    _groups = _Groups(model, data, pipeline, next(r for r in pipe_ranks if rank in r))


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and :func:`destroy_model_parallel` not since)."""
    return _groups is not None


def _get() -> _Groups:
    if _groups is None:
        raise RuntimeError(
            "model parallel group is not initialized: call "
            "tp_ffn.fairscale.initialize.initialize_model_parallel(model_parallel_size) first"
        )
    return _groups


def get_model_parallel_group() -> ProcessGroup:
    """This rank's model-parallel (tensor-parallel) group."""
    return _get().model


def get_data_parallel_group() -> ProcessGroup:
    """This rank's data-parallel group: the ranks that hold the same shard."""
    return _get().data


def get_pipeline_parallel_group() -> ProcessGroup:
    """This rank's pipeline group."""
    return _get().pipeline


def get_pipeline_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline group, in stage order."""
    return list(_get().pipeline_ranks)


def get_model_parallel_world_size() -> int:
    return dist.get_world_size(get_model_parallel_group())


def get_model_parallel_rank() -> int:
    """This rank's index in its model-parallel group: which shard (``consolidated.XX.pth``) it holds."""
    return dist.get_rank(get_model_parallel_group())


def get_model_parallel_src_rank() -> int:
    """The global rank of model-parallel rank 0 of this rank's group (the source of broadcasts)."""
    return dist.get_global_rank(get_model_parallel_group(), 0)


def get_data_parallel_world_size() -> int:
    return dist.get_world_size(get_data_parallel_group())


def get_data_parallel_rank() -> int:
    return dist.get_rank(get_data_parallel_group())


def destroy_model_parallel() -> None:
    """Forget the groups, as fairscale does; :func:`initialize_model_parallel` may run again."""
    global _groups
    _groups = None
