"""A tensor-parallel block refuses to run under data parallelism that spans its own tensor-parallel group.

``DistributedDataParallel`` over the whole world (what ``transformers.Trainer`` builds under torchrun) treats
the ranks of a tensor-parallel group as replicas: its constructor broadcasts rank 0's parameters, so the
other ranks' MLP shards are overwritten by rank 0's, and its sampler gives each of them other batches. Nothing
fails; the model is trained wrong. Each block that :func:`~tp_ffn.hf.parallelize_mlp` builds carries
:func:`refuse_data_parallel_over_tp_group` as a forward pre-hook, so the first forward under such a wrapper
stops with one line, before any optimizer step. (Where the shards differ in shape, at sizes the group does not
divide, DDP's constructor already stops at its own shape check.)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["refuse_data_parallel_over_tp_group"]

# (DDP wrapper, tensor-parallel group) pairs found to be fine: the check costs one lookup per forward.
_checked: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    if group is None:
        return [dist.get_rank()] if dist.is_initialized() else [0]
    return dist.get_process_group_ranks(group)


def refuse_data_parallel_over_tp_group(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: ``RuntimeError`` when the active ``DistributedDataParallel`` spans two or more
    ranks of ``module.tp`` (the block's tensor-parallel group)."""
    if torch.compiler.is_compiling():
        return
    ddp = DistributedDataParallel._active_ddp_module
    tp = module.tp
    if ddp is None or tp.size == 1:
        return
    done = _checked.setdefault(ddp, set())
    if id(tp.group) in done:
        return
    dp_ranks, tp_ranks = _ranks(ddp.process_group), _ranks(tp.group)
    shared = sorted(set(dp_ranks) & set(tp_ranks))
    if len(shared) > 1:
        raise RuntimeError(
            f"tp_ffn.hf: the model is wrapped in DistributedDataParallel over ranks {dp_ranks}, which holds ranks "
            f"{shared} of one tensor-parallel group (whose MLP shards it has overwritten with rank {dp_ranks[0]}'s); "
            "call tp_ffn.hf.prepare_trainer(trainer) before trainer.train(), or wrap only across tensor-parallel "
            "groups"
        )
    done.add(id(tp.group))

