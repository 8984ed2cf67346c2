"""Writing training checkpoints: atomic, checked for space, a failed write reported as one line, and
optionally in the background (DCP's ``async_save``).

A save of step N (collective over the world)::

    rank 0   free space >= the newest checkpoint's size?  ->  mkdir DIR/.tmp-step_N-<random>/
    all      DCP writes the shards (:class:`CheckpointWriter`: fsync, each rank digests its files
             as it finishes them; ``--ckpt-async``: from a CPU copy, in DCP's background thread)
    all      gather what each rank wrote (or the error it met)
    rank 0   copy the extra files (tokenizer), write meta.json (every file's size and SHA-256),
             fsync, rename .tmp-step_N-<random>/ -> step_N/, fsync DIR; then --keep-last prunes

A crash at any moment leaves either no ``step_N`` or a complete one, and never touches older
checkpoints. A write that fails (ENOSPC, EDQUOT, EIO, a vanished mount; on any rank, in any phase)
is agreed by every rank: rank 0 removes the partial directory and every rank raises the same
:class:`SaveError` (one line naming the directory, the error and the newest good checkpoint).
``--keep-last`` prunes only after the new checkpoint is complete, so a failed save keeps them all.

The index records no path and no random id (DCP's ``StorageMeta`` is left out, and no tensor is
marked pinned): two saves of the same state are the same bytes, whether written synchronously or
from a staged copy in the background.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

from ..consensus import decided_by_rank_0
from ..errors import UsageError
from .digests import ALGORITHM, file_digest

__all__ = [
    "EXIT_SAVE_FAILED",
    "FORMAT",
    "META",
    "CheckpointWriter",
    "SaveError",
    "Saver",
    "checkpoint_bytes",
    "save_atomic",
    "step_dir",
]

FORMAT = "tp_ffn.train.checkpoint/1"
META = "meta.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-step_"
EXIT_SAVE_FAILED = 3
_FULL_BYTES = 1 << 20  # less free than this after a failed write: the disk is full


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}"


class SaveError(UsageError):
    """A checkpoint that could not be written, or would not fit: nothing older was lost, the
    partial directory is gone. Reported as one line like a :class:`UsageError`, exit status 3."""

    exit_status = EXIT_SAVE_FAILED


def checkpoint_bytes(meta: Mapping[str, Any]) -> int | None:
    """The total size of a checkpoint's files as its ``meta.json`` lists them (``None``: not listed)."""
    files = meta.get("files")
    if not isinstance(files, dict):
        return None
    total = 0
    for entry in files.values():
        size = entry.get("size") if isinstance(entry, dict) else entry
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        total += size
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _error_text(e: BaseException) -> str:
    """The error a failed write met, in one line: DCP's exception carries every rank's failure (the
    first is named), OSError says errno, reason and file."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(inner, BaseException):
            return f"rank {rank}: {_error_text(inner)}"
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror or e}{where}"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


class CheckpointWriter(dcp.FileSystemWriter):
    """DCP's file-system writer with fsync, plus: the index holds no path or random id, and each rank
    digests the files it wrote right after writing them (while they are in the page cache; for an
    async save in DCP's background thread). :attr:`written` maps each file name to its size and
    digest; rank 0's includes DCP's index (``.metadata``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, sync_files=True)
        self.written: dict[str, dict[str, Any]] = {}

    def storage_meta(self) -> None:  # type: ignore[override]
        return None  # DCP would record the temporary path and a random id: not needed to read it back

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future:
        future = super().write_data(plan, planner)
        names = sorted({r.storage_data.relative_path for r in future.wait()})
        root = Path(self.path)
        self.written.update({n: _entry(root / n) for n in names})
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        index = Path(self.path) / ".metadata"
        self.written[index.name] = _entry(index)


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, ALGORITHM: file_digest(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; the ones that could not be
    deleted, with why (a checkpoint is first renamed out of view, so a half-deleted one is never read)."""
    complete = sorted(p for p in root.iterdir() if STEP_RE.match(p.name) and (p / META).exists())
    failed = []
    for old in complete[:-keep_last]:
        doomed = root / f"{TMP_PREFIX}deleted-{old.name}-{secrets.token_hex(4)}"
        try:
            os.rename(old, doomed)
        except OSError as e:
            failed.append(f"{old.name} ({e.strerror or e})")
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    return failed


@dataclass
class _Save:
    """A save begun: its directories, what goes into meta.json, and (background) DCP's future."""

    step: int
    tmp: Path
    final: Path
    meta: dict[str, Any]
    rng_keys: list[str]
    extra_files: Mapping[str, Path]
    writer: CheckpointWriter
    future: Future | None = None
    error: str | None = None  # this rank's failure while writing


class Saver:
    """Writes the checkpoints of one ``--ckpt-dir`` (collective over the world; see the module docstring).

    ``newest``: the newest complete checkpoint already there and its size in bytes (the first
    free-space check compares with it; later ones with the last checkpoint written here).
    ``background``: saves go through ``dcp.async_save`` on a gloo group of their own, at most one
    in flight; :meth:`poll`, :meth:`wait` and the next :meth:`save` complete it.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        *,
        keep_last: int = 0,
        background: bool = False,
        newest: tuple[Path, int | None] | None = None,
        warn: Any = None,
    ) -> None:
        self.root = Path(ckpt_dir)
        self.keep_last = keep_last
        self.background = background
        self.newest_path, self.newest_bytes = newest if newest is not None else (None, None)
        self.pending: _Save | None = None
        self.warn = warn if warn is not None else (lambda text: print(text, file=sys.stderr, flush=True))
        self.rank = dist.get_rank() if _is_dist() else 0
        self.world = dist.get_world_size() if _is_dist() else 1
        # DCP's background thread runs its own collectives: on a group of their own, so that they
        # never interleave with training's, and on gloo (the staged copy is in CPU memory).
        self.group = dist.new_group(backend="gloo") if background and _is_dist() else None

    # ------------------------------------------------------------------------------------------

    def save(
        self,
        state: dict[str, Any],
        planner: SavePlanner | None,
        step: int,
        meta: dict[str, Any],
        *,
        extra_files: Mapping[str, Path] | None = None,
        background: bool | None = None,
    ) -> Path | None:
        """Save ``state`` as ``step_<step>``; the path once complete, ``None`` when it is being
        written in the background or already exists (then nothing is written). Raises :class:`SaveError`."""
        self.wait()
        background = self.background if background is None else background
        tmp_name = decided_by_rank_0(lambda: self._begin(step), what=f"where to save step {step}")
        if tmp_name is None:
            return None
        tmp = self.root / tmp_name
        job = _Save(
            step, tmp, step_dir(self.root, step), meta, sorted(k for k in state if k.startswith("rng.")),
            dict(extra_files or {}), CheckpointWriter(tmp),
        )  # fmt: skip
        if background:
            try:
                job.future = dcp.async_save(state, storage_writer=job.writer, planner=planner, process_group=self.group)
            except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - staging failed (memory): reported below
                job.error = _error_text(e)
                return self._complete(job)
            self.pending = job
            return None
        try:
            dcp.save(state, storage_writer=job.writer, planner=planner, no_dist=not _is_dist())
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - every rank's failure, agreed below
            job.error = _error_text(e)
        return self._complete(job)

    def pending_here(self) -> bool:
        """Whether this rank's part of the save in flight is still being written."""
        return self.pending is not None and self.pending.future is not None and not self.pending.future.done()

    def poll(self, done_everywhere: bool) -> Path | None:
        """Complete the save in flight once every rank has written its part (``done_everywhere``,
        agreed by the caller: :func:`tp_ffn.train.consensus.any_rank` of :meth:`pending_here`).
        Collective when it completes it."""
        if self.pending is None or not done_everywhere:
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Wait for the save in flight, if any, and complete it (collective); its path."""
        job, self.pending = self.pending, None
        if job is None:
            return None
        assert job.future is not None
        try:
            job.future.result()
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - agreed and reported below
            job.error = _error_text(e)
        return self._complete(job)

    def abandon(self) -> None:
        """Forget the save in flight without completing it (after an error that not every rank saw:
        no collective). Its directory stays a ``.tmp-step_*``, which the next run removes."""
        self.pending = None

    # ------------------------------------------------------------------------------------------

    def _newest_text(self) -> str:
        return str(self.newest_path) if self.newest_path is not None else "none"

    def _begin(self, step: int) -> str | None:
        """Rank 0: check the space and create the temporary directory; its name, or None if
        ``step_<step>`` exists."""
        final = step_dir(self.root, step)
        if final.exists():
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.newest_bytes:
                free = shutil.disk_usage(self.root).free
                if free < self.newest_bytes:
                    raise SaveError(
                        f"--ckpt-dir {self.root}: {_human(free)} free, but the checkpoint of step {step} needs about "
                        f"{_human(self.newest_bytes)} (the size of {self.newest_path.name if self.newest_path else 'the last one'}): "
                        f"not saved, training stopped after step {step}; newest checkpoint: {self._newest_text()}; "
                        f"free some space, then --resume"
                    )
            name = f"{TMP_PREFIX}{step:08d}-{secrets.token_hex(4)}"
            (self.root / name).mkdir()
        except OSError as e:
            raise SaveError(
                f"checkpoint of step {step} could not be started in --ckpt-dir {self.root} ({_error_text(e)}); "
                f"newest checkpoint: {self._newest_text()}; fix the directory, then --resume"
            ) from None
        return name

    def _complete(self, job: _Save) -> Path:
        """Gather every rank's outcome; rank 0 writes meta.json and renames, or removes the partial
        directory; every rank returns the path or raises the same :class:`SaveError`."""
        outcome: tuple[str | None, dict[str, Any]] = (job.error, job.writer.written if job.error is None else {})
        if _is_dist():
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, outcome)
        else:
            parts = [outcome]
        errors = [(r, e) for r, (e, _) in enumerate(parts) if e is not None]
        files: dict[str, dict[str, Any]] = {}
        for _, written in parts:
            files.update(written)

        def finish() -> None:
            if errors:
                rank, text = errors[0]
                raise self._failed(job, text if text.startswith("rank ") else f"rank {rank}: {text}")
            try:
                self._publish(job, files)
            except OSError as e:
                raise self._failed(job, f"rank 0: {_error_text(e)}") from None

        decided_by_rank_0(finish, what=f"the checkpoint of step {job.step}")
        # (rank 0's ``files`` now lists the extra files too: rank 0 is the one that checks the space)
        self.newest_path, self.newest_bytes = job.final, sum(f["size"] for f in files.values())
        return job.final

    def _failed(self, job: _Save, error: str) -> SaveError:
        """Rank 0, once every rank has stopped writing: remove the partial directory; the error."""
        try:  # torch.save's zip writer reports a full disk as "unexpected pos ...": say what was free
            free = shutil.disk_usage(job.tmp).free
            if "No space left" not in error and free < _FULL_BYTES:
                error += f" (the file system is full: {_human(free)} free)"
        except OSError:
            pass
        shutil.rmtree(job.tmp, ignore_errors=True)
        left = " (it could not be removed: delete it by hand)" if job.tmp.exists() else " (removed)"
        return SaveError(
            f"checkpoint of step {job.step} could not be written to {job.tmp}{left}: {error}; older checkpoints are "
            f"kept, the newest: {self._newest_text()}; free space or fix the mount, then --resume"
        )

    def _publish(self, job: _Save, files: dict[str, dict[str, Any]]) -> None:
        """Rank 0: the extra files, meta.json, fsync, the rename, --keep-last."""
        for name, src in job.extra_files.items():
            _copy_synced(Path(src), job.tmp / name)
            files[name] = _entry(job.tmp / name)
        full_meta = {
            "format": FORMAT, "step": job.step, "world": self.world, "rng": job.rng_keys, **job.meta,
            "files": dict(sorted(files.items())),
        }  # fmt: skip
        with open(job.tmp / META, "w") as f:
            json.dump(full_meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(job.tmp)
        os.rename(job.tmp, job.final)
        try:  # the checkpoint is complete from here on: what fails now is worth a warning, not the run
            _fsync_dir(self.root)
        except OSError as e:
            self.warn(f"warning: {self.root}: fsync after renaming {job.final.name} failed ({e.strerror or e})")
        if self.keep_last > 0:
            for failure in prune(self.root, self.keep_last):
                self.warn(f"warning: --keep-last {self.keep_last}: could not delete {failure}")


def save_atomic(
    ckpt_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    planner: SavePlanner | None = None,
    keep_last: int = 0,
    extra_files: Mapping[str, Path] | None = None,
) -> Path | None:
    """Save ``state`` as ``ckpt_dir/step_<step>`` now (collective); ``None`` when it already exists.

    ``meta`` goes to ``meta.json`` with the format, step, world size and each file's size and
    SHA-256 added; ``planner`` is DCP's (a :class:`~tp_ffn.train.checkpoint.store.BlockSavePlanner` for
    sharded state). ``extra_files`` (name -> source, e.g. the tokenizer's files) are copied into the
    checkpoint beside DCP's, and listed and digested in ``meta.json`` like them. ``keep_last > 0``
    then deletes all but the newest ``keep_last`` complete checkpoints. Raises :class:`SaveError`.
    """
    return Saver(ckpt_dir, keep_last=keep_last).save(state, planner, step, meta, extra_files=extra_files)
