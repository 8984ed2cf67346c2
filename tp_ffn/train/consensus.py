"""Decisions each rank takes from what it sees, agreed on by every rank before anyone acts.

A rank decides from its own view of the file system (which checkpoint is the newest, whether a
file exists, whether a directory can be written). A node without the shared mount, or a relative
path on a rank started in another directory, sees something else; if each rank acted on its own
view, they would wait in different collectives until the timeout. :func:`agree` runs such a check
on every rank, gathers what each found (the value's description, or the error) and, when they
differ, raises one :class:`UsageError` on every rank that names the ranks and what each saw.
:func:`decided_by_rank_0` is for what only rank 0 may do (take the run's lock, check the free
space): the others learn its verdict. :func:`any_rank` tells every rank, in one small all-reduce,
which of a few flags (a stop signal, a save still being written) any rank has raised.
:func:`report_error` prints a :class:`UsageError` from the rank(s) that should print it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .errors import UsageError

# Seconds a rank that prints nothing waits before exiting under torchrun (see report_error).
QUIET_RANK_GRACE_S = 2.0

__all__ = ["agree", "any_rank", "decided_by_rank_0", "report_error"]

T = TypeVar("T")


def _rank_list(ranks: list[int]) -> str:
    """``[1]`` -> ``rank 1``; ``[0, 1, 2, 5]`` -> ``ranks 0-2, 5``."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def agree(
    fn: Callable[[], T],
    *,
    what: str = "what each rank found",
    describe: Callable[[T], str] | None = None,
    where: str | None = None,
    group: ProcessGroup | None = None,
) -> T:
    """Run ``fn`` on every rank of ``group`` (default: the world) and return its value once every
    rank found the same.

    ``describe`` maps the value to the text that must be equal on every rank (without it only the
    errors are compared); ``where`` is this rank's context for the message (e.g. the absolute
    path a relative one named here). If every rank raised the same :class:`UsageError`, it is
    raised on every rank; if the ranks saw different things, a :class:`UsageError` saying "the
    ranks disagree about ``what``" lists the ranks and what each saw. Either error is marked
    ``agreed``. Any other exception is raised again on the ranks that had it; the others raise a
    ``RuntimeError`` naming them, so that nobody waits for them. Collective; without a process
    group (or with a group of one) it only runs ``fn``.
    """
    value: Any = None
    outcome: tuple[str, str]
    unexpected: BaseException | None = None
    try:
        value = fn()
        outcome = ("ok", describe(value) if describe is not None else "no error")
    except UsageError as e:
        outcome = ("error", str(e))
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: re-raised below, after telling the others
        unexpected, outcome = e, ("crash", f"{type(e).__name__}: {e}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if unexpected is not None:
            raise unexpected
        if outcome[0] == "error":
            raise UsageError(outcome[1], agreed=True)
        return value
    size = dist.get_world_size(group)
    seen: list[Any] = [None] * size
    dist.all_gather_object(seen, (outcome, where), group=group)
    ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(size)]
    if unexpected is not None:
        raise unexpected
    crashed = [r for r, ((kind, _), _) in zip(ranks, seen) if kind == "crash"]
    if crashed:
        raise RuntimeError(f"{_rank_list(crashed)} failed while checking {what}: {seen[ranks.index(crashed[0])][0][1]}")
    outcomes = {o for o, _ in seen}
    if len(outcomes) == 1:
        if outcome[0] == "error":
            raise UsageError(outcome[1], agreed=True)
        return value
    groups: dict[tuple[tuple[str, str], str | None], list[int]] = {}
    for r, key in zip(ranks, seen):
        groups.setdefault(key, []).append(r)
    parts = [f"{_rank_list(rs)}: {text}" + (f", {w}" if w else "") for ((_, text), w), rs in groups.items()]
    raise UsageError(f"the ranks disagree about {what}: " + "; ".join(parts), agreed=True)


def _distributed(group: ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def decided_by_rank_0(fn: Callable[[], T], *, what: str, group: ProcessGroup | None = None) -> T:
    """Run ``fn`` on rank 0 of ``group`` (default: the world) only; every rank returns its value.

    A :class:`UsageError` raised by ``fn`` is raised on every rank (``agreed``); any other
    exception is raised again on rank 0 and as a ``RuntimeError`` naming it on the others, so
    nobody waits. The value must be picklable (it is broadcast). Collective.
    """
    if not _distributed(group):
        try:
            return fn()
        except UsageError as e:
            e.agreed = True
            raise
    src = dist.get_global_rank(group, 0) if group is not None else 0
    mine = dist.get_rank(group) == 0
    value: Any = None
    outcome: tuple[str, Any] = ("ok", None)
    unexpected: BaseException | None = None
    if mine:
        try:
            value = fn()
            outcome = ("ok", value)
        except UsageError as e:
            outcome = ("error", (type(e), str(e)))  # the class too: a subclass carries its exit status
        except Exception as e:  # noqa: BLE001 - told to the others below, then re-raised here
            unexpected, outcome = e, ("crash", f"{type(e).__name__}: {e}")
    box: list[Any] = [outcome]
    dist.broadcast_object_list(box, src=src, group=group)
    kind, payload = box[0]
    if unexpected is not None:
        raise unexpected
    if kind == "error":
        cls, message = payload
        raise cls(message, agreed=True)
    if kind == "crash":
        raise RuntimeError(f"rank {src} failed while deciding {what}: {payload}")
    return value if mine else payload


def any_rank(flags: list[bool], device: torch.device, group: ProcessGroup | None = None) -> list[bool]:
    """``flags[i]`` is True on every rank that returns once it is True on any rank of ``group``.

    One all-reduce (MAX) of ``len(flags)`` bytes on ``device`` (so NCCL runs use the GPU's link).
    Collective; without a process group (or with a group of one) the flags themselves.
    """
    if not _distributed(group):
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.uint8, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def report_error(prog: str, error: UsageError) -> None:
    """Print ``prog: error: <error>`` on stderr from the rank(s) that should.

    An agreed error is printed by global rank 0. One that a single rank saw after the process group
    existed is printed by that rank, prefixed with its number. Anything else was raised before the
    process group existed (arguments, the device): the same on every rank of a node, so local rank 0
    prints it.
    """
    if error.agreed:
        show, prefix = int(os.environ.get("RANK", "0")) == 0, ""
    elif error.rank is not None:
        show, prefix = True, f"rank {error.rank}: "
    else:
        show, prefix = int(os.environ.get("LOCAL_RANK", "0")) == 0, ""
    if show:
        print(f"{prog}: error: {prefix}{error}", file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun stops every worker as soon as one exits: a quiet rank that exits first could get
        # the printing rank killed before its line is out. Leave it a moment to print and exit.
        time.sleep(QUIET_RANK_GRACE_S)
