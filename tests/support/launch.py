"""Launching the commands as users do (torchrun agents in their own sessions, plain python), finding and
reaping their workers, reading the steps a run logged: shared by the script-level training tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tp_ffn.train.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--corpus-bytes", "200000", "--val-every", "10",
         "--val-sequences", "8", "--warmup-steps", "5", "--seed", "0", "--no-progress"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _launcher(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra]


def _torchrun(
    nproc: int, script: str, *args: str, launcher: tuple[str, ...] = ("--standalone",), timeout: float = 200
) -> subprocess.CompletedProcess:
    cmd = _launcher(nproc, *launcher) + [script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python script ...`` without torchrun: a world of one."""
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so the test can find torchrun's workers."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _worker_with_rank(agent: int, rank: int) -> int | None:
    for pid in _descendants(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return pid
    return None


def _spawn(cmd: list[str], **kw) -> subprocess.Popen:
    """Start a torchrun agent in its own session, so that :func:`_reap` can end it and its workers."""
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, **kw)


def _reap(*agents: subprocess.Popen) -> None:
    """Kill what is left of agents started by :func:`_spawn` and of their workers (torchrun starts
    the workers in sessions of their own), after a failed or timed-out test."""
    for agent in agents:
        if agent.poll() is None:
            for pid in [*_descendants(agent.pid), agent.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            agent.wait(timeout=30)


def _steps(metrics: Path) -> list[int]:
    return [r["step"] for r in read_metrics(metrics) if "loss" in r] if metrics.exists() else []
