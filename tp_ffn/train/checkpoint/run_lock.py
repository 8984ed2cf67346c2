"""One run per checkpoint directory: a lock held in ``--ckpt-dir`` for the run's lifetime.

Two runs writing into one directory mix their checkpoints (a requeued job beside its old self, a
typo in a script): ``step_20`` from one, ``step_40`` from the other, and a later ``--resume`` reads
them as one run. So a training run holds ``DIR/.run.lock`` while it runs:

- an OS lock (``flock(2)``, exclusive, not waiting) on that file, taken by global rank 0 only (the
  other ranks learn the verdict: :func:`tp_ffn.train.consensus.decided_by_rank_0`). The kernel
  drops it when the process ends however it ends, so a killed run leaves nothing stale behind. The
  file says who holds it (host, pid, since when), for the refusal of a second run.
- where the file system has no working locks (``flock`` fails with ENOLCK, ENOSYS, EOPNOTSUPP:
  some FUSE and object-store mounts, Lustre without ``-o flock``), a lease file ``DIR/.run.lease``
  instead: host, pid, start time and a heartbeat that a thread renews every
  :data:`HEARTBEAT_S` seconds. A lease is taken over once its heartbeat is older than
  :data:`STALE_S` (clocks of the nodes must agree to within a few seconds), or at once when it
  names a process of this host that no longer exists.

An NFS mount with ``nolock`` or ``local_lock=all`` grants ``flock`` per host only: two hosts both
get it. That cannot be told from here; such a mount needs ``-o lock`` (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["HEARTBEAT_S", "LEASE_NAME", "LOCK_NAME", "STALE_S", "RunLock", "acquire_run_lock"]

LOCK_NAME = ".run.lock"
LEASE_NAME = ".run.lease"
HEARTBEAT_S = 30.0
STALE_S = 120.0
# flock errors that mean "this file system does not do locks", not "someone else holds it".
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def _holder_record(kind: str) -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now, "kind": kind,
        "token": secrets.token_hex(8),
    }  # fmt: skip


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(holder: dict[str, Any] | None, path: Path) -> str:
    if not isinstance(holder, dict):
        return f"another run holds {path} (it has not said who yet)"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, running since {_when(holder.get('since'))}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    """The lock this run holds on ``root`` (see the module docstring); :meth:`release` ends it."""

    root: Path
    kind: str  # "flock" or "lease"
    holder: dict[str, Any]
    created_root: bool = False
    _fd: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.root / (LOCK_NAME if self.kind == "flock" else LEASE_NAME)

    def release(self) -> None:
        """Give the lock up: the lock file is removed while still locked (a run waiting on the old
        file sees that it was replaced and tries again), the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.kind == "flock" and self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        elif self.kind == "lease":
            current = _read_json(self.path)
            if current is not None and current.get("token") == self.holder["token"]:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        if self.created_root:  # made for this run, which wrote nothing into it: leave no trace
            with contextlib.suppress(OSError):
                self.root.rmdir()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = _read_json(self.path)
            if current is None or current.get("token") != self.holder["token"]:
                return  # taken over (this run was thought dead): the other run's now; say nothing here
            self.holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                _write_atomic(self.path, self.holder)


def _write_atomic(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _refusal(root: Path, holder: dict[str, Any] | None, path: Path, extra: str = "") -> UsageError:
    return UsageError(
        f"--ckpt-dir {root} is in use by another run ({_describe(holder, path)}{extra}; lock {path}): "
        f"one run per checkpoint directory; wait for it to end or choose another --ckpt-dir (nothing was changed)"
    )


def _try_flock(root: Path) -> tuple[int | None, OSError | None]:
    """An fd holding the exclusive flock on ``root/.run.lock``; ``(None, error)`` when it is taken
    (EWOULDBLOCK) or the file system has no locks (one of :data:`_NO_LOCKS`)."""
    path = root / LOCK_NAME
    for _ in range(10):  # the file may be replaced under us by a run that just released it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            return None, e
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)  # locked a file its holder removed on release: lock the one there now
    return None, OSError(errno.EAGAIN, "the lock file kept being replaced")


def _take_lease(root: Path) -> RunLock:
    path = root / LEASE_NAME
    record = _holder_record("lease")
    current = _read_json(path)
    if current is not None and current.get("token") != record["token"]:
        age = time.time() - float(current.get("heartbeat", 0) or 0)
        dead_here = current.get("host") == record["host"] and not _pid_alive(current.get("pid"))
        if age < STALE_S and not dead_here:
            raise _refusal(root, current, path, f", heartbeat {age:.0f} s ago; a lease is stale after {STALE_S:.0f} s")
    try:
        if current is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # first come, first served
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
        else:
            _write_atomic(path, record)
    except FileExistsError:
        raise _refusal(root, _read_json(path), path) from None
    # Two runs that took a stale lease at once: the later write wins, the other one sees it here.
    time.sleep(0.2)
    now = _read_json(path)
    if now is None or now.get("token") != record["token"]:
        raise _refusal(root, now, path)
    lock = RunLock(root, "lease", record)
    lock._thread = threading.Thread(target=lock._heartbeat, name="tp_ffn-run-lease", daemon=True)
    lock._thread.start()
    return lock


def acquire_run_lock(ckpt_dir: str | os.PathLike) -> RunLock:
    """Take the run's lock on ``ckpt_dir`` (created if missing) or raise :class:`UsageError` naming
    the run that holds it. Rank 0 only; never waits."""
    root = Path(ckpt_dir)
    created = False
    if not root.exists():
        try:
            root.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise UsageError(f"--ckpt-dir {root}: cannot create it ({e.strerror or e})") from None
    try:
        fd, error = _try_flock(root)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise UsageError(f"--ckpt-dir {root}: cannot create the run's lock file in it ({e.strerror or e})") from None
    if fd is not None:
        record = _holder_record("flock")
        with contextlib.suppress(OSError):  # who holds it, for the refusal of another run
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        return RunLock(root, "flock", record, created_root=created, _fd=fd)
    assert error is not None
    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _refusal(root, _read_json(root / LOCK_NAME), root / LOCK_NAME)
    if error.errno in _NO_LOCKS:
        with contextlib.suppress(OSError):
            (root / LOCK_NAME).unlink()
        lock = _take_lease(root)
        lock.created_root = created
        return lock
    raise UsageError(f"--ckpt-dir {root}: cannot lock {root / LOCK_NAME} ({error.strerror or error})")
