"""The documented Slurm recipe (scripts/slurm/train.sbatch, included verbatim in docs/cluster.md)
on a real one-node Slurm (Debian's slurm-wlm and munge, started by tests/support/slurm_cluster.py, as
root, installed where missing), on CPU: the file exactly as documented, with the node count and
the ranks per node given as sbatch options and variables, and a small model given as train.py
arguments after the script.

One job lives through what a cluster does to it: Slurm's warning before the time limit (USR1 to
the batch shell, as ``--signal=B:USR1@300`` sends it) requeues it, and the requeued job resumes;
then ``scancel`` (SIGTERM to every process of the job, SIGKILL after KillWait) stops it; each time
the ranks save the step they reached. The same job submitted again resumes and ends with the
losses and weights of an uninterrupted run. Before this work the job lost every step since its last
periodic checkpoint and ended in tracebacks (issue 21).

Where Slurm cannot be installed (not root, no apt-get, no network) the test is skipped, saying why;
under CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from support.launch import SMALL
from support.slurm_cluster import SlurmCluster, ensure_installed

from tp_ffn.train.checkpoint.store import load_full_tensors
from tp_ffn.train.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "scripts/slurm/train.sbatch"
STEPS = 300
# train.py arguments after the script: the small model of the other CLI tests, no periodic save.
TRAIN_ARGS = [*SMALL, "--steps", str(STEPS), "--val-every", "100", "--timeout", "120"]


def test_the_docs_show_the_tested_script_verbatim():
    script = (ROOT / SCRIPT).read_text()
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"```bash\n{script}```\n" in docs, "docs/cluster.md does not hold scripts/slurm/train.sbatch verbatim"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Slurm test: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), kill_wait=30, cred_expire=10)
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"Slurm is installed but its daemons did not start: {e}")
    yield cluster
    cluster.stop()


def _env(ck: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # torchrun
    return {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": "2", "CKPT_DIR": str(ck), "CKPT_EVERY": "1000",
    }  # fmt: skip


def _submit(slurm: SlurmCluster, out: Path, ck: Path) -> int:
    # Node count and ranks per node as the docs say to give them (no GPUs here: NPROC_PER_NODE).
    return slurm.sbatch("--nodes=1", f"--output={out}", SCRIPT, *TRAIN_ARGS, cwd=ROOT, env=_env(ck))


def _steps(metrics: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(metrics) if "loss" in r]
    except (OSError, ValueError):
        return []


def _wait(what: str, ready, slurm: SlurmCluster, job: int, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        state = slurm.state(job)
        if time.monotonic() > deadline or state in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            log = out.read_text()[-3000:] if out.exists() else "(no output)"
            raise AssertionError(f"{what}: job {job} is {state}\n{log}\n{slurm.log_tail()}")
        time.sleep(0.1)


def _stops(text: str) -> list[tuple[int, str]]:
    return [(int(s), p) for s, p in re.findall(r"train\.py: stopped by SIGTERM after step (\d+): saved (\S+);", text)]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sbatch_recipe_survives_requeue_and_scancel_and_ends_equal_to_an_uninterrupted_run(slurm, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "job.out"
    metrics = ck / "metrics.jsonl"
    job = _submit(slurm, out, ck)

    # 1. The time limit is near: Slurm sends USR1 to the batch shell; the job requeues itself.
    _wait("reaching step 5", lambda: len(_steps(metrics)) >= 5, slurm, job, out)
    slurm.scancel("--batch", "--signal=USR1", str(job))
    _wait("the first stop", lambda: len(_stops(out.read_text())) == 1, slurm, job, out)
    ((first, saved),) = _stops(out.read_text())
    assert saved == str(ck / f"step_{first:08d}") and first < STEPS

    # 2. The requeued job resumes from that step; then it is cancelled (SIGTERM, KillWait 30 s).
    resumed = f"resumed from {ck / f'step_{first:08d}'} (step {first},"
    _wait("the requeued job's resume", lambda: resumed in out.read_text(), slurm, job, out, timeout=400)
    _wait("5 steps after the resume", lambda: (_steps(metrics) or [0])[-1] >= first + 5, slurm, job, out)
    slurm.scancel(str(job))
    assert slurm.wait_done(job, timeout=120) == "CANCELLED"
    text = out.read_text()
    assert "time limit near, requeueing job" in text and len(_stops(text)) == 2, text[-3000:]
    second, saved = _stops(text)[1]
    assert saved == str(ck / f"step_{second:08d}") and first < second < STEPS
    assert _steps(metrics)[-1] == second  # the step it reached is the step saved: nothing lost
    assert sorted(p.name for p in ck.glob("step_*")) == [f"step_{first:08d}", f"step_{second:08d}"]
    assert "tp_ffn/train" not in text and 'scripts/train.py", line' not in text, text[-3000:]  # no traceback of ours

    # 3. The same job submitted again resumes and finishes.
    again = _submit(slurm, tmp_path / "again.out", ck)
    assert slurm.wait_done(again, timeout=600) == "COMPLETED", (tmp_path / "again.out").read_text()[-3000:]
    assert f"resumed from {ck / f'step_{second:08d}'}" in (tmp_path / "again.out").read_text()

    # An uninterrupted run of the same script: the same losses, step for step, and the same weights.
    ref_ck = tmp_path / "ref"
    ref = _submit(slurm, tmp_path / "ref.out", ref_ck)
    assert slurm.wait_done(ref, timeout=600) == "COMPLETED", (tmp_path / "ref.out").read_text()[-3000:]
    got_rows = [r for r in read_metrics(metrics) if "loss" in r]
    ref_rows = [r for r in read_metrics(ref_ck / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]
    a = load_full_tensors(ref_ck / f"step_{STEPS:08d}", prefix="")
    b = load_full_tensors(ck / f"step_{STEPS:08d}", prefix="")
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
