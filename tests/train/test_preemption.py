"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank after the same step, that step is
saved, and the run resumed from it continues exactly as the uninterrupted run (bit for bit: the
same layout, so the same summation order; the spec asks 1e-6, equality is what holds).

In-process runs (two gloo ranks) send the signal to one rank from inside its training step or
inside a save; real processes (plain python, torchrun) get it from outside, as a scheduler sends it.
Before this work, each of these runs died on the signal (SIGTERM's default action) with nothing saved.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.launch import SMALL, _launcher, _reap, _spawn, _steps
from support.preempt_runs import _run, _signal_inside_save, _signalled, _wait_for_step
from support.rankpool import run_ranks

from tp_ffn.train.checkpoint import store as ck

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            d = tmp_path_factory.mktemp(f"uninterrupted_w{world}")
            cache[world] = run_ranks(world, _run, {"tp": world, "ckpt_dir": str(d)}, timeout=240)[0]
        return cache[world]

    return get


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("world", "who", "signame"), [(2, 1, "SIGTERM"), (1, 0, "SIGUSR1")])
def test_stop_signal_saves_the_step_reached_and_the_resumed_run_is_bit_exact(
    uninterrupted, tmp_path, world, who, signame
):
    ref = uninterrupted(world)
    d = tmp_path / "run"
    got = run_ranks(world, _signalled, {"tp": world, "ckpt_dir": str(d)}, 5, who, signame, timeout=240)
    for g in got:  # every rank stopped after the same step, with the same checkpoint
        assert (g["stopped_by"], g["final"], len(g["losses"])) == (signame, 5, 5), g
        assert g["checkpoints"] == [str(d / "step_00000005")], g
    assert got[0]["losses"] == ref["losses"][:5]
    info, _ = ck.find_latest(d)
    assert info is not None and info.step == 5
    ck.verify_checkpoint(info)
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")], "a lock or partial save was left"

    resumed = run_ranks(world, _run, {"tp": world, "ckpt_dir": str(d), "resume": True}, timeout=240)[0]
    assert resumed["start"] == 5 and resumed["stopped_by"] is None
    assert resumed["losses"] == ref["losses"][5:]  # bit for bit


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_signals_during_a_save_let_it_complete_and_corrupt_nothing(uninterrupted, tmp_path):
    ref = uninterrupted(2)
    d = tmp_path / "run"
    got = run_ranks(2, _signal_inside_save, {"tp": 2, "ckpt_dir": str(d), "ckpt_every": 4}, timeout=240)
    for g in got:
        assert (g["stopped_by"], g["final"]) == ("SIGTERM", 4), g
        assert g["checkpoints"] == [str(d / "step_00000004")], g
    ck.verify_checkpoint(d / "step_00000004")  # every file's digest, the index, the model config
    assert sorted(p.name for p in d.iterdir()) == ["metrics.jsonl", "step_00000004"]
    resumed = run_ranks(2, _run, {"tp": 2, "ckpt_dir": str(d), "resume": True}, timeout=240)[0]
    assert resumed["losses"] == ref["losses"][4:]


# --------------------------------------------------------------------------------------------------
# Real processes: the signal from outside, the one line, the exit status, the time it takes

_LINE = re.compile(r"^(.+?): stopped by SIGTERM after step (\d+): saved (\S+); exit status 75 ", re.MULTILINE)
# Every way of starting the job ends through the same runner (tp_ffn/train/__main__.py): the same line, under
# the name it was started as, and the same status.
PROGS = {"python": "train.py", "module": "python -m tp_ffn.train", "console": "tp-ffn-train", "torchrun": "train.py"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["python", "module", "console", "torchrun"])
def test_sigterm_from_outside_saves_and_exits_75_within_30_s(tmp_path, launcher):
    ck_dir = tmp_path / "ck"
    args = ["scripts/train.py", *SMALL, "--steps", "100000", "--ckpt-dir", str(ck_dir), "--ckpt-every", "100000"]
    if launcher == "python":
        cmd = [sys.executable, *args]
    elif launcher == "module":
        cmd = [sys.executable, "-m", "tp_ffn.train", *args[1:]]
    elif launcher == "console":
        console = Path(sys.executable).parent / "tp-ffn-train"
        if not console.is_file():
            pytest.skip("tp-ffn is not installed (pip install -e .): no console script to run")
        cmd = [str(console), *args[1:]]
    else:
        cmd = _launcher(2, "--standalone") + [*args, "--tp", "2"]
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = _spawn(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(proc, ck_dir / "metrics.jsonl", 3)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)  # the agent, for torchrun: it forwards SIGTERM to its workers
            if launcher != "torchrun":  # a scheduler that signals again: the exit status must survive it
                for _ in range(20):
                    time.sleep(0.25)
                    if proc.poll() is not None:
                        break
                    os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
            seconds = time.monotonic() - t0
        finally:
            _reap(proc)
    text = log.read_text()
    lines = _LINE.findall(text)
    assert len(lines) == 1 and lines[0][0] == PROGS[launcher], text[-3000:]
    step, saved = int(lines[0][1]), Path(lines[0][2])
    assert saved == ck_dir / f"step_{step:08d}" and step == max(_steps(ck_dir / "metrics.jsonl")), text[-2000:]
    ck.verify_checkpoint(saved)
    assert seconds < 30, f"{launcher} took {seconds:.1f} s to stop"
    assert "tp_ffn/train" not in text and 'scripts/train.py", line' not in text, text[-3000:]  # no traceback of ours
    # The exit status a scheduler requeues on. torchrun reports its own signal instead (status 1,
    # with its own traceback): the sbatch script decides on requeueing, see scripts/slurm/train.sbatch.
    assert code == (1 if launcher == "torchrun" else 75), text[-2000:]
