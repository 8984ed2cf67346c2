"""--ckpt-async: saves go through DCP's ``async_save`` (a CPU copy, written in DCP's background
thread), one at a time, and what lands on disk is byte for byte what a synchronous save writes;
preemption and the end of the run wait for the save in flight. (Before this work there was no
--ckpt-async: every save stopped training for its whole write.) Its cost is measured by
benchmarks/bench_ckpt.py, smoke-run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.launch import _env
from support.preempt_runs import BASE, _run, _signalled
from support.rankpool import run_ranks

from tp_ffn.train.checkpoint import store as ck

ROOT = Path(__file__).resolve().parents[2]
RUN = {**BASE, "steps": 6, "ckpt_every": 2, "tp": 2, "val_every": 3}


def _counted(rank: int, world: int, overrides: dict) -> dict:
    """``_run`` counting DCP's save calls, and checking that an async save never starts while
    another is still being written."""
    import torch.distributed.checkpoint as dcp

    from tp_ffn.train.checkpoint import saving

    real_async, real_save = dcp.async_save, dcp.save
    calls = {"async_save": 0, "save": 0, "overlapping": 0}
    futures = []

    def async_save(*a, **kw):
        calls["async_save"] += 1
        calls["overlapping"] += sum(not f.done() for f in futures)
        futures.append(real_async(*a, **kw))
        return futures[-1]

    def save(*a, **kw):
        calls["save"] += 1
        return real_save(*a, **kw)

    saving.dcp.async_save, saving.dcp.save = async_save, save
    try:
        return {**_run(rank, world, overrides), "calls": calls}
    finally:
        saving.dcp.async_save, saving.dcp.save = real_async, real_save


def _files(step: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(step.iterdir())}


@pytest.mark.timeout(400)
def test_async_checkpoints_are_the_bytes_of_synchronous_ones(tmp_path):
    sync = run_ranks(2, _counted, {**RUN, "ckpt_dir": str(tmp_path / "sync")}, timeout=240)
    bg = run_ranks(2, _counted, {**RUN, "ckpt_dir": str(tmp_path / "async"), "ckpt_async": True}, timeout=240)
    assert bg[0]["losses"] == sync[0]["losses"]
    for r in range(2):  # steps 2 and 4 in the background, the last one written before the run ends
        assert sync[r]["calls"] == {"async_save": 0, "save": 3, "overlapping": 0}
        assert bg[r]["calls"] == {"async_save": 2, "save": 1, "overlapping": 0}
        assert bg[r]["checkpoints"] == [str(tmp_path / "async" / f"step_0000000{s}") for s in (2, 4, 6)]
    for step in ("step_00000002", "step_00000004", "step_00000006"):
        a, b = _files(tmp_path / "sync" / step), _files(tmp_path / "async" / step)
        assert sorted(a) == sorted(b) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
        for name in a:
            if name != "meta.json":
                assert a[name] == b[name], f"{step}/{name} differs"
        ma, mb = json.loads(a["meta.json"]), json.loads(b["meta.json"])
        assert ma["args"].pop("ckpt_async") is False and mb["args"].pop("ckpt_async") is True
        assert Path(ma["args"].pop("ckpt_dir")).name == "sync" and Path(mb["args"].pop("ckpt_dir")).name == "async"
        assert ma == mb  # every file's size and digest, the step, the model, the data, the other arguments
        ck.verify_checkpoint(tmp_path / "async" / step)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stop_signal_waits_for_the_save_in_flight_then_saves_its_step(tmp_path):
    d = tmp_path / "ck"
    got = run_ranks(2, _signalled, {**RUN, "ckpt_dir": str(d), "ckpt_async": True}, 3, 0, "SIGTERM", timeout=240)
    for g in got:
        assert (g["stopped_by"], g["final"]) == ("SIGTERM", 3), g
        assert g["checkpoints"] == [str(d / "step_00000002"), str(d / "step_00000003")], g
    for step in ("step_00000002", "step_00000003"):
        ck.verify_checkpoint(d / step)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_ckpt_smoke(tmp_path):
    out = tmp_path / "ckpt.json"
    cmd = [sys.executable, "benchmarks/bench_ckpt.py", "--rounds", "1", "--steps-between", "2", "--seq-len", "32"]
    cmd += ["--check-calls", "20", "--dir", str(tmp_path / "ck"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    (pair,) = result["rounds"]
    assert pair["sync"]["stall_s"] > 0 and 0 < pair["async"]["call_s"] <= pair["async"]["stall_s"]
    assert result["summary"]["stop_check_us"] > 0 and result["checkpoint_bytes"] > 1e6
    assert not (tmp_path / "ck").exists()  # the scratch checkpoints are removed
