"""Before step 1: every output path can be created and written, and ``--ckpt-dir`` is the same
directory for every rank.

Without this check a ``--ckpt-dir`` under a regular file, or a ``--metrics`` file in a read-only
place, was found at the first save or at the end, after the work was done. And a checkpoint
directory that some ranks do not share (a node without the mount, a relative path on a rank
started elsewhere) would get each rank's shard files in a different place: a checkpoint that
looks complete on rank 0 and cannot be loaded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch.distributed as dist

from ..consensus import agree
from ..errors import UsageError

__all__ = ["check_outputs"]

_PROBE = ".tp_ffn-write-check-"


def _why(e: OSError) -> str:
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)


def _probe_write(path: Path, text: str, flag: str, shown: str) -> None:
    try:
        with open(path, "x") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot write into it ({_why(e)})") from None


def _check_file(path: Path, flag: str, shown: str) -> None:
    """``path`` can be created (its parents too) or appended to; an existing file is not changed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        what = "it" if str(path) == shown else str(path)
        raise UsageError(f"{flag} {shown}: cannot write {what} ({_why(e)})") from None


def check_outputs(ckpt_dir: str | None, metrics: Path | None, *, rank: int) -> None:
    """Raise the same :class:`UsageError` on every rank unless the outputs can be written.

    Rank 0 creates ``ckpt_dir`` and writes a file with a random name into it, and checks that the
    metrics file and its plot (``.png``) can be written (only rank 0 writes them). Then every rank
    looks for rank 0's file in its own view of ``ckpt_dir`` and writes a file of its own there
    (each rank writes its shards of every checkpoint). The files are removed again; a directory
    created here is removed when the check fails. Collective over the world.
    """
    root = Path(ckpt_dir) if ckpt_dir is not None else None
    created = False
    token = secrets.token_hex(8)

    def on_rank_0() -> None:
        nonlocal created
        if rank != 0:
            return
        if root is not None:
            created = not root.exists()
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                created = False
                raise UsageError(f"--ckpt-dir {ckpt_dir}: cannot create it ({_why(e)})") from None
            _probe_write(root / f"{_PROBE}{token}", token, "--ckpt-dir", str(ckpt_dir))
        if metrics is not None:
            _check_file(metrics, "--metrics", str(metrics))
            _check_file(metrics.with_suffix(".png"), "--metrics", str(metrics))

    failed = True
    try:
        agree(on_rank_0, what="the output paths")
        if root is None:
            return
        box = [token]
        dist.broadcast_object_list(box, src=0)
        token = box[0]

        def on_every_rank() -> None:
            probe = root / f"{_PROBE}{token}"
            try:
                seen = probe.read_text()
            except OSError:
                seen = None
            if seen != token:
                raise UsageError(
                    f"cannot see {probe.name}, which rank 0 just wrote into it: every rank must write into the "
                    f"same directory (a file system shared by every node)"
                )
            if rank != 0:
                mine = root / f"{_PROBE}{token}-rank{rank}"
                _probe_write(mine, token, "--ckpt-dir", str(ckpt_dir))
                mine.unlink()

        agree(on_every_rank, what=f"--ckpt-dir {ckpt_dir}", where=f"in {os.path.abspath(root)}")
        failed = False
    finally:
        if rank == 0 and root is not None:
            with contextlib.suppress(OSError):
                (root / f"{_PROBE}{token}").unlink()
            if created and failed:
                with contextlib.suppress(OSError):
                    root.rmdir()  # made here for a run that will not start; only if empty
