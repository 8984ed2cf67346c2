"""One run per --ckpt-dir: a second run is refused before it trains (one line naming the first run,
exit status 2) and the first goes on untouched; a killed run leaves no lock that blocks the next
one, and --resume removes the partial saves it left. Without working file locks, a lease file with
a heartbeat does the same job.

Before this work the second run trained into the same directory: its checkpoints and metrics lines
mixed with the first run's, and a save of one could fail on the other's directory (reproduced in
issue 21).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.launch import SMALL, _env, _launcher, _reap, _spawn
from support.preempt_runs import _wait_for_step

from tp_ffn.train.errors import UsageError
from tp_ffn.train.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\nfrom tp_ffn.train.checkpoint.run_lock import acquire_run_lock\n"
    "lock = acquire_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)\n"
)


@pytest.fixture
def run_lock():
    """The module under test, imported here so that the real-run tests below also run against code without it."""
    from tp_ffn.train.checkpoint import run_lock

    return run_lock


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_flock_refuses_a_second_holder_and_the_kernel_frees_it_when_the_first_dies(tmp_path, run_lock):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(UsageError) as e:
            run_lock.acquire_run_lock(tmp_path)
        text = str(e.value)
        assert f"host {socket.gethostname()}, pid {proc.pid}, running since 20" in text, text
        assert "\n" not in text and str(tmp_path / ".run.lock") in text
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".run.lock").exists()  # left by the killed holder, but no longer locked
    lock = run_lock.acquire_run_lock(tmp_path)
    assert lock.kind == "flock" and json.loads((tmp_path / ".run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".run.lock").exists()


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locks (some FUSE mounts, Lustre without -o flock): flock fails ENOLCK."""

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_lease_when_the_file_system_has_no_locks(tmp_path, run_lock, no_flock, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    lock = run_lock.acquire_run_lock(tmp_path)
    try:
        assert lock.kind == "lease" and not (tmp_path / ".run.lock").exists()
        lease = json.loads((tmp_path / ".run.lease").read_text())
        assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
        first = lease["heartbeat"]
        time.sleep(0.6)
        assert json.loads((tmp_path / ".run.lease").read_text())["heartbeat"] > first  # renewed
        # A second run (another pid on this host, a live one) is refused, naming the holder.
        lease["pid"], lease["token"] = os.getppid(), "other"
        (tmp_path / ".run.lease").write_text(json.dumps(lease))
        with pytest.raises(UsageError, match=rf"in use by another run \(host \S+, pid {os.getppid()}, .*heartbeat"):
            run_lock.acquire_run_lock(tmp_path)
    finally:
        lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["stale heartbeat", "dead pid on this host"])
def test_a_dead_runs_lease_is_taken_over(tmp_path, run_lock, no_flock, case):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = {"host": socket.gethostname(), "pid": dead.pid, "since": 1.0, "heartbeat": time.time(), "token": "old"}
    if case == "stale heartbeat":
        lease.update(host="elsewhere", pid=1, heartbeat=time.time() - run_lock.STALE_S - 1)
    (tmp_path / ".run.lease").write_text(json.dumps(lease))
    lock = run_lock.acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / ".run.lease").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".run.lease").exists()


def test_lease_negative_control_a_live_lease_elsewhere_is_not_taken(tmp_path, run_lock, no_flock):
    """The takeover above is about the dead holder: the same lease, fresh and from another host, holds."""
    lease = {"host": "elsewhere", "pid": 1, "since": 1.0, "heartbeat": time.time(), "token": "old"}
    (tmp_path / ".run.lease").write_text(json.dumps(lease))
    with pytest.raises(UsageError, match=r"host elsewhere, pid 1"):
        run_lock.acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / ".run.lease").read_text())["token"] == "old"


# --------------------------------------------------------------------------------------------------
# Real runs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_run_is_refused_and_the_first_goes_on_untouched(tmp_path):
    ck = tmp_path / "ck"
    first_cmd = [sys.executable, "scripts/train.py", *SMALL, "--steps", "100000", "--ckpt-dir", str(ck)]
    first_cmd += ["--ckpt-every", "3"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = _spawn(first_cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(first, ck / "metrics.jsonl", 4)
            # Another seed and --resume (a requeued job beside its old self), under torchrun: rank 0
            # holds the lock, rank 1 learns the verdict.
            second = subprocess.run(
                _launcher(2, "--standalone") + ["scripts/train.py", *SMALL, "--tp", "2", "--seed", "1", "--steps",
                "100000", "--ckpt-dir", str(ck), "--resume", "--ckpt-every", "3"],
                cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            reached = max(r["step"] for r in read_metrics(ck / "metrics.jsonl"))
            _wait_for_step(first, ck / "metrics.jsonl", reached + 3)  # the first run is still training
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=120) == 75
        finally:
            _reap(first)
    out = second.stdout + second.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("train.py: error:")]
    assert second.returncode != 0 and "exitcode  : 2" in out, out[-3000:]
    assert len(lines) == 1, out[-3000:]
    assert re.search(rf"--ckpt-dir {re.escape(str(ck))} is in use by another run \(host {re.escape(socket.gethostname())}, "
                     rf"pid {first.pid}, running since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC; lock ", lines[0]), lines[0]  # fmt: skip
    assert "tp_ffn/train" not in out, out[-3000:]  # no traceback of ours
    # Nothing of the second run is in the directory: every checkpoint is the first run's (seed 0),
    # each metrics step is logged once.
    metas = [json.loads((p / "meta.json").read_text()) for p in sorted(ck.glob("step_*"))]
    assert len(metas) >= 2 and {m["args"]["seed"] for m in metas} == {0} and {m["world"] for m in metas} == {1}
    steps = [r["step"] for r in read_metrics(ck / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_a_killed_run_resume_takes_the_lock_and_removes_its_partial_saves(tmp_path):
    ck = tmp_path / "ck"
    args = ["scripts/train.py", *SMALL, "--steps", "100000", "--ckpt-dir", str(ck), "--ckpt-every", "2"]
    with open(tmp_path / "first.log", "w") as out:
        first = _spawn([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(first, ck / "metrics.jsonl", 3)
            os.kill(first.pid, signal.SIGKILL)  # no handler runs: the lock file stays, unlocked
            first.wait(timeout=30)
        finally:
            _reap(first)
    assert (ck / ".run.lock").exists()
    partial = ck / ".tmp-step_00000099-0badc0de"  # what a save cut short by the kill leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 4096)
    # The kill may also have cut a real save short: every partial directory is the dead run's.
    partials = sorted(p.name for p in ck.glob(".tmp-*"))
    newest = max(int(p.name[5:]) for p in ck.glob("step_*"))
    r = subprocess.run(
        [sys.executable, "scripts/train.py", *SMALL, "--steps", str(newest + 2), "--ckpt-dir", str(ck), "--resume"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    removed = re.search(rf"^removed {len(partials)} partial checkpoint\(s\) of an interrupted save: (.*)$", r.stdout, re.MULTILINE)
    assert removed and sorted(removed.group(1).split(", ")) == partials and partial.name in partials, r.stdout[-2000:]
    assert f"resumed from {ck / f'step_{newest:08d}'}" in r.stdout
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
