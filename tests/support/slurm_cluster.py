"""A one-node Slurm cluster for the tests: Debian's slurm-wlm and munge, started in a directory of
their own and stopped again by pid.

:func:`ensure_installed` installs the packages where they are missing (root only: ``apt-get update``
then ``apt-get install``) and returns ``None``, or the reason it could not. :class:`SlurmCluster`
writes a munge key and a ``slurm.conf`` naming this host (``proctrack/linuxproc``, ``task/none``,
``select/cons_tres``, every CPU of the machine, free ports), starts ``munged``, ``slurmctld`` and
``slurmd`` in the foreground (so their pids are the ones to stop) and waits until the node takes
jobs. Nothing outside the directory is touched: the daemons use their own socket, state, spool and
log files, so a system Slurm or munge beside them is left alone. Client commands find the cluster
through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`).

By hand, for experiments::

    python tests/support/slurm_cluster.py /tmp/slurm     # start, print the environment, wait for Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
__all__ = ["PACKAGES", "SlurmCluster", "ensure_installed"]


def _missing() -> list[str]:
    return [
        d for d in (*DAEMONS, "sbatch", "scancel", "squeue", "scontrol") if shutil.which(d, path=_sbin_path()) is None
    ]


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def ensure_installed(timeout: float = 900) -> str | None:
    """Install slurm-wlm and munge where a daemon or client is missing; ``None`` when all are there,
    else why not (not root, no apt-get, the install failed: its last lines)."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s"
        if r.returncode != 0:
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
            return f"`{' '.join(cmd)}` failed (exit status {r.returncode}): {tail}"
    if _missing():
        return f"installed {' '.join(PACKAGES)}, but {', '.join(_missing())} are still missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """One node (this host, every CPU), one partition ``debug``; daemons run as root.

    ``kill_wait``: seconds between SIGTERM and SIGKILL when a job is cancelled (slurm.conf
    ``KillWait``; Slurm's default is 30). ``cred_expire``: seconds a requeued job waits before it may
    start again (``AuthInfo=cred_expire``; Slurm's default is 120).
    """

    def __init__(self, root: str | os.PathLike, *, kill_wait: int = 30, cred_expire: int = 10) -> None:
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, scancel, ...): this cluster's slurm.conf."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def _write_config(self) -> None:
        for d in ("state", "spool", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        lines = [
            "ClusterName=tpffntest",
            f"SlurmctldHost={self.node}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"KillWait={self.kill_wait}",
            "SlurmdTimeout=300",
            "InactiveLimit=0",
            "MinJobAge=300",
            f"NodeName={self.node} CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.stdout", "ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )  # fmt: skip

    def _munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def start(self, timeout: float = 60) -> None:
        """Start the three daemons and wait until the node is idle (raises RuntimeError with the logs' tail)."""
        self._write_config()
        m = self.root / "munge"
        self._start(
            "munged",
            [shutil.which("munged", path=_sbin_path()) or "munged", "--foreground", "--force",
             f"--socket={self._munge_socket()}", f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
             f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
        )  # fmt: skip
        self._wait(lambda: self._munge_socket().exists(), timeout, "munged did not create its socket")
        conf = ["-f", str(self.conf)]
        self._start("slurmctld", [shutil.which("slurmctld", path=_sbin_path()) or "slurmctld", "-D", "-i", *conf])
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld does not answer")
        self._start("slurmd", [shutil.which("slurmd", path=_sbin_path()) or "slurmd", "-D", "-N", self.node, *conf])
        self._wait(self._node_idle, timeout, f"node {self.node} did not become idle")

    def _run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def _node_idle(self) -> bool:
        r = self._run("sinfo", "--noheader", "--format=%t", "--nodes", self.node)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: {', '.join(dead)} exited; {self.log_tail()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s; {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        out = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", *(f"{d}.stdout" for d in DAEMONS)):
            p = self.root / name
            if p.exists():
                tail = p.read_text(errors="replace").strip().splitlines()[-lines:]
                if tail:
                    out.append(f"{name}: " + " | ".join(tail))
        return "; ".join(out)

    def stop(self) -> None:
        """Kill the jobs still running (a test that failed half-way), then SIGTERM each daemon this
        object started (slurmd first), SIGKILL what is left after 15 s."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            self._run("scancel", "--partition=debug", "--signal=KILL")
            self._run("scancel", "--partition=debug")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._run("squeue", "--noheader").stdout.strip():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        self.procs.clear()

    # Jobs ----------------------------------------------------------------------------------------

    def sbatch(self, *args: str, cwd: str | os.PathLike, env: dict[str, str] | None = None) -> int:
        """Submit a job (``sbatch --parsable ARGS``) and return its id."""
        r = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), from scontrol (no accounting)."""
        r = self._run("scontrol", "show", "job", str(job), "--oneliner")
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def exit_code(self, job: int) -> str:
        """``ExitCode=status:signal`` of a finished job."""
        r = self._run("scontrol", "show", "job", str(job), "--oneliner")
        for field in r.stdout.split():
            if field.startswith("ExitCode="):
                return field.split("=", 1)[1]
        return "?"

    def wait_done(self, job: int, timeout: float) -> str:
        """Wait until the job has left the queue's active states; its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout:.0f} s; {self.log_tail()}")

    def scancel(self, *args: str) -> None:
        r = self._run("scancel", *args)
        if r.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(args)} failed: {r.stderr.strip()}")


if __name__ == "__main__":
    reason = ensure_installed()
    if reason:
        sys.exit(reason)
    cluster = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tp_ffn_slurm")
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}  # pids: {', '.join(f'{n} {p.pid}' for n, p in cluster.procs.items())}")
    print(f"stop: kill -TERM {os.getpid()}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
