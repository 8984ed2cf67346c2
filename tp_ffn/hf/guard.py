"""A tensor-parallel block refuses to run under data parallelism that spans its own tensor-parallel group.

``DistributedDataParallel`` over the whole world (what ``transformers.Trainer`` builds under torchrun) treats
the ranks of a tensor-parallel group as replicas: its constructor broadcasts rank 0's parameters, so the
other ranks' MLP shards are overwritten by rank 0's, and its sampler gives each of them other batches. Nothing
fails; the model is trained wrong. Each block that :func:`~tp_ffn.hf.parallelize_mlp` builds carries
:func:`refuse_data_parallel_over_tp_group` as a forward pre-hook, so the first forward under such a wrapper
stops with one line, before any optimizer step. :func:`guard` also makes ``DistributedDataParallel``'s
constructor refuse such a block, with the same line, when the wrapper takes the model: before DDP's broadcast
(nothing is overwritten) and before its own shape check, which stops ranks whose shards differ in shape (sizes
the group does not divide) with a size mismatch on some ranks and "Connection closed by peer" on the others.
The constructor check is a module registration hook (``register_module_module_registration_hook``): DDP
assigns ``self.module`` after it knows its process group and before it communicates.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["guard", "refuse_data_parallel_over_tp_group", "unguard"]

# (DDP wrapper, tensor-parallel group) pairs found to be fine: the check costs one lookup per forward.
_checked: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    if group is None:
        return [dist.get_rank()] if dist.is_initialized() else [0]
    return dist.get_process_group_ranks(group)


# Blocks built by tp_ffn.hf; the registration hook looks for them in what a DDP wrapper takes.
_guarded: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hook: Any = None


def _refusal(dp_ranks: list[int], shared: list[int], what: str) -> str:
    return (
        f"tp_ffn.hf: the model is wrapped in DistributedDataParallel over ranks {dp_ranks}, which holds ranks "
        f"{shared} of one tensor-parallel group ({what}); call tp_ffn.hf.prepare_trainer(trainer) before "
        "trainer.train(), or wrap only across tensor-parallel groups"
    )


def _shared_ranks(ddp_group: dist.ProcessGroup | None, tp_group: dist.ProcessGroup | None) -> tuple[list[int], list[int]]:
    dp_ranks = _ranks(ddp_group)
    return dp_ranks, sorted(set(dp_ranks) & set(_ranks(tp_group)))


def _on_registration(parent: nn.Module, name: str, child: Any) -> None:
    """Global module registration hook: a ``DistributedDataParallel`` taking a model that holds a guarded
    block whose tensor-parallel group it spans raises before it communicates."""
    if not isinstance(parent, DistributedDataParallel) or name != "module" or not isinstance(child, nn.Module):
        return None
    if not _guarded:
        return None
    seen: set[int] = set()
    for sub in child.modules():
        if sub not in _guarded or sub.tp.size == 1 or id(sub.tp.group) in seen:
            continue
        seen.add(id(sub.tp.group))
        dp_ranks, shared = _shared_ranks(parent.process_group, sub.tp.group)
        if len(shared) > 1:
            raise RuntimeError(_refusal(dp_ranks, shared, "nothing was changed: refused before its broadcast"))
    return None


def guard(block: nn.Module) -> None:
    """Make ``block`` (with a ``tp`` group) refuse data parallelism over its own tensor-parallel group: when a
    ``DistributedDataParallel`` takes a model holding it, and at its first forward under one."""
    global _hook
    block.register_forward_pre_hook(refuse_data_parallel_over_tp_group)
    _guarded.add(block)
    if _hook is None:
        _hook = nn.modules.module.register_module_module_registration_hook(_on_registration)


def unguard(block: nn.Module) -> None:
    """Undo :func:`guard` for ``block`` (tests show what happens without it)."""
    _guarded.discard(block)
    for key, hook in list(block._forward_pre_hooks.items()):
        if hook is refuse_data_parallel_over_tp_group:
            del block._forward_pre_hooks[key]


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
    dp_ranks, shared = _shared_ranks(ddp.process_group, tp.group)
    if len(shared) > 1:
        raise RuntimeError(_refusal(dp_ranks, shared, f"whose MLP shards it has overwritten with rank {dp_ranks[0]}'s"))
    done.add(id(tp.group))

