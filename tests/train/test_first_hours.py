"""What users hit in their first hours with the scripts: ranks that see different files fail fast
with one line, output paths checked before step 1, bad flags as one line, a resumed run that keeps
its learning-rate schedule."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.launch import SMALL, _env, _launcher, _reap, _spawn
from support.rankpool import run_ranks
from support.scriptmain import _load_script

from tp_ffn.train import UsageError
from tp_ffn.train.run.metrics import read_metrics
from tp_ffn.train.run.optim import WarmupCosine

ROOT = Path(__file__).resolve().parents[2]
TRAIN, SAMPLE = str(ROOT / "scripts" / "train.py"), str(ROOT / "scripts" / "sample.py")
LR, MIN_RATIO, WARMUP = 3e-3, 0.1, 5  # train.py's defaults, SMALL's warmup


def _py(script: str, *args: str, cwd: Path = ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python script ...`` (a world of one) in ``cwd``."""
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _error_lines(r: subprocess.CompletedProcess, prog: str) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(f"{prog}: error:")]


def _no_traceback_of_ours(out: str) -> None:
    """No worker printed a traceback (torchrun's own report of the failed workers is not ours)."""
    assert not re.search(r'(tp_ffn/|scripts/\w+\.py)", line \d+', out), out[-4000:]


def _one_line(r: subprocess.CompletedProcess, prog: str, pattern: str) -> str:
    lines = _error_lines(r, prog)
    assert len(lines) == 1, r.stdout + r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    _no_traceback_of_ours(r.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 10-step run at world size 1, saved as ``<dir>/ck/step_00000010`` (``ck`` relative to ``<dir>``)."""
    home = tmp_path_factory.mktemp("home")
    r = _py(TRAIN, *SMALL, "--steps", "10", "--ckpt-dir", "ck", cwd=home)
    assert r.returncode == 0, r.stderr[-3000:]
    return home


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. Ranks that see different files


def _torchrun_in_dirs(dirs: list[Path], script: str, *args: str, limit: float = 150) -> tuple[int, str, float]:
    """torchrun with local rank r in ``dirs[r]``; returns (exit status, output, seconds)."""
    cmd = _launcher(len(dirs), "--standalone") + [
        str(ROOT / "tests" / "support" / "chdir_by_rank.py"), os.pathsep.join(map(str, dirs)), script, *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    agent = _spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = agent.communicate(timeout=limit)[0]
    except subprocess.TimeoutExpired:
        out = f"(killed after {limit} s: a hang)"
    finally:
        _reap(agent)
    return agent.returncode, out, time.monotonic() - t0


DISAGREEMENTS = {
    "train --resume": (TRAIN, [*SMALL, "--tp", "2", "--steps", "12", "--ckpt-dir", "ck", "--resume"], "train.py",
                       r"ranks disagree about .*--ckpt-dir ck.*rank 0: step_00000010 .*rank 1: no checkpoint"),
    "sample": (SAMPLE, ["--ckpt-dir", "ck", "--max-new-tokens", "4"], "sample.py",
               r"ranks disagree about .*ck.*rank 0: step_00000010 .*rank 1: .*no complete checkpoint"),
    # No checkpoint on either side: the directory itself must be the same one for every rank.
    "train fresh": (TRAIN, [*SMALL, "--tp", "2", "--steps", "2", "--ckpt-dir", "fresh"], "train.py",
                    r"--ckpt-dir fresh.*rank 1: cannot see .*which rank 0 just wrote into it.*shared"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_ranks_that_see_different_files_fail_fast_with_one_line(trained, tmp_path, case):
    """Rank 1 works in another directory, so the relative --ckpt-dir names another place there (a
    node without the shared mount). Each run must end with one line naming the ranks and what each
    saw, long before --timeout (600 s; it used to be a hang until then, and sample.py printed
    nothing because only rank 0 printed and rank 0 had succeeded; a fresh run wrote each rank's
    shards into a different directory)."""
    script, args, prog, pattern = DISAGREEMENTS[case]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = _snapshot(trained / "ck")
    code, out, seconds = _torchrun_in_dirs([trained, elsewhere], script, *args)
    lines = [ln for ln in out.splitlines() if ln.startswith(f"{prog}: error:")]
    assert code != 0 and len(lines) == 1, out[-4000:]
    assert re.search(pattern, lines[0]), lines[0]
    _no_traceback_of_ours(out)
    assert seconds < 90, f"{prog} took {seconds:.0f} s to fail"
    assert _snapshot(trained / "ck") == before, "the checkpoint directory changed"
    assert not (trained / "fresh").exists() and not (elsewhere / "fresh").exists()


# --------------------------------------------------------------------------------------------------
# 5. Output paths


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unusable_output_paths_fail_before_step_1(tmp_path):
    """--ckpt-dir under a regular file and --metrics in an unwritable place used to train every
    step and then die at the first save (or the end). Now: one line, exit 2, no step run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = _py(TRAIN, *SMALL, "--steps", "3", "--ckpt-dir", str(blocker / "ck"))
    assert r.returncode == 2
    _one_line(r, "train.py", r"--ckpt-dir .*a_file/ck: cannot create it")
    assert "done:" not in r.stdout and "tp_ffn train:" not in r.stdout  # failed before the model was built

    metrics = tmp_path / "run" / "m.jsonl"
    metrics.parent.mkdir()
    metrics.mkdir()  # a directory where the file should go
    r = _py(TRAIN, *SMALL, "--steps", "3", "--metrics", str(metrics))
    assert r.returncode == 2
    _one_line(r, "train.py", r"--metrics .*m.jsonl: cannot write it")

    if os.path.isdir("/sys") and _unwritable("/sys"):  # even root cannot create files there
        r = _py(TRAIN, *SMALL, "--steps", "3", "--metrics", "/sys/tp_ffn_metrics.jsonl")
        assert r.returncode == 2
        _one_line(r, "train.py", r"--metrics /sys/tp_ffn_metrics.jsonl: cannot write it")


def _unwritable(directory: str) -> bool:
    try:
        with open(os.path.join(directory, ".tp_ffn_probe"), "w"):
            pass
    except OSError:
        return True
    os.unlink(os.path.join(directory, ".tp_ffn_probe"))
    return False


def _bad_outputs(rank: int, world: int, ckpt_dir: str) -> str:
    from tp_ffn.train import TrainConfig, train

    try:
        train(TrainConfig(**_small_config(), steps=2, tp=2, ckpt_dir=ckpt_dir))
    except UsageError as e:
        return f"{e} agreed={e.agreed}"
    return "NO ERROR"


def _small_config() -> dict:
    return {
        "preset": "tiny", "seq_len": 32, "batch_size": 8, "corpus_bytes": 200_000, "val_every": 10,
        "val_sequences": 8, "warmup_steps": WARMUP, "seed": 0, "progress": False,
    }  # fmt: skip


@pytest.mark.timeout(120)
def test_unusable_ckpt_dir_is_agreed_by_every_rank(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    got = run_ranks(2, _bad_outputs, str(blocker / "ck"), timeout=90)
    assert got[0] == got[1] and "cannot create it" in got[0] and got[0].endswith("agreed=True"), got


# --------------------------------------------------------------------------------------------------
# 6. One line instead of a traceback


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(trained):
    r = _py(TRAIN, *SMALL, "--steps", "1", "--device", "cuda")
    assert r.returncode == 2
    _one_line(r, "train.py", r"--device cuda: CUDA is not available")
    r = _py(SAMPLE, "--ckpt-dir", str(trained / "ck"), "--device", "cuda")
    assert r.returncode == 2
    _one_line(r, "sample.py", r"--device cuda: CUDA is not available")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--temperature", "-0.5"], r"--temperature: expected a number >= 0 \(0: greedy\), got -0.5"),
        (["--temperature", "nan"], r"--temperature: expected a number >= 0 \(0: greedy\), got nan"),
        (["--top-k", "-1"], r"--top-k: expected an int >= 0"),
    ],
)
def test_sample_flags_are_checked(argv, pattern, capsys):
    code = _load_script("sample").main(["--ckpt-dir", "unused", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(pattern, err[0]), err


def _sample_at_tp(rank: int, world: int, path: str) -> str:
    from tp_ffn.train.run.generate import load_checkpoint_model

    try:
        load_checkpoint_model(path)
    except UsageError as e:
        return str(e)
    return "NO ERROR"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sample_at_a_tp_size_that_does_not_split_the_heads(trained):
    got = run_ranks(3, _sample_at_tp, str(trained / "ck"), timeout=90)
    assert len(set(got)) == 1, got
    assert re.search(r"n_heads \(4\) and n_kv_heads \(2\) .* tensor-parallel size \(3\)", got[0]), got[0]
    assert "run it on 1 or 2 ranks" in got[0], got[0]


def _parity_hidden_below_ranks(rank: int, world: int) -> str:
    parity = _load_script("parity", "benchmarks")
    try:
        parity.run(parity.ParityConfig(dim=8, hidden_dim=2), torch.device("cpu"))
    except ValueError as e:
        return str(e)
    return "NO ERROR"


@pytest.mark.timeout(120)
def test_parity_blames_hidden_dim_below_the_ranks():
    for got in run_ranks(3, _parity_hidden_below_ranks, timeout=90):
        assert "--hidden-dim: expected at least one row per rank (>= the world size 3), got 2" in got, got
        assert "pretraining_tp" not in got


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_at_or_past_the_last_step_says_so(trained, tmp_path):
    """--steps equal to the checkpoint's step: nothing to do, said in one line, exit 0 (a finished
    job run again, e.g. restarted by torchrun after its last save, is done). Below it: exit 2."""
    run = tmp_path / "ck"
    shutil.copytree(trained / "ck", run)
    before = _snapshot(run)
    r = _py(TRAIN, *SMALL, "--steps", "10", "--ckpt-dir", str(run), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(r"step_00000010 is already at --steps 10: nothing to do", lines[0]), r.stdout
    r = _py(TRAIN, *SMALL, "--steps", "7", "--ckpt-dir", str(run), "--resume")
    assert r.returncode == 2
    _one_line(r, "train.py", r"--steps 7 is below the step of .*step_00000010 \(10\).*nothing was changed")
    assert _snapshot(run) == before


# --------------------------------------------------------------------------------------------------
# 7. The learning-rate schedule of a resumed run


def _lrs(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(metrics) if "lr" in r}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_keeps_the_lr_schedule_unless_told(trained, tmp_path):
    """A 10-step run continued to 14: steps 11-14 stay at the cosine floor (they jumped back up to
    the cosine of a 14-step schedule), the run says so in one line, and meta.json records the
    schedule; --lr-schedule-steps 20 stretches the cosine instead."""
    floor = LR * MIN_RATIO

    kept = tmp_path / "kept"
    shutil.copytree(trained / "ck", kept)
    r = _py(TRAIN, *SMALL, "--steps", "14", "--ckpt-dir", str(kept), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = _lrs(kept / "metrics.jsonl")
    assert [lrs[s] for s in range(11, 15)] == pytest.approx([floor] * 4, rel=1e-12)
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("lr schedule:")]
    assert len(notes) == 1 and "--lr-schedule-steps 14" in notes[0], r.stdout
    assert json.loads((trained / "ck" / "step_00000010" / "meta.json").read_text())["lr_schedule_steps"] == 10
    assert json.loads((kept / "step_00000014" / "meta.json").read_text())["lr_schedule_steps"] == 10

    stretched = tmp_path / "stretched"
    shutil.copytree(trained / "ck", stretched)
    r = _py(TRAIN, *SMALL, "--steps", "14", "--ckpt-dir", str(stretched), "--resume", "--lr-schedule-steps", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("lr schedule:")]
    schedule = WarmupCosine(WARMUP, 20, MIN_RATIO)
    lrs = _lrs(stretched / "metrics.jsonl")
    assert [lrs[s] for s in range(11, 15)] == pytest.approx([LR * schedule(s - 1) for s in range(11, 15)], rel=1e-12)
    assert json.loads((stretched / "step_00000014" / "meta.json").read_text())["lr_schedule_steps"] == 20


def test_schedule_length_of_older_checkpoints():
    from tp_ffn.train import TrainConfig
    from tp_ffn.train.run.trainer import lr_schedule_steps

    cfg = TrainConfig(steps=120)
    assert lr_schedule_steps(cfg, None) == (120, None)  # a fresh run: --steps
    assert lr_schedule_steps(TrainConfig(steps=120, lr_schedule_steps=200), {"lr_schedule_steps": 60})[0] == 200
    steps, note = lr_schedule_steps(cfg, {"args": {"steps": 60}})  # written before meta.json recorded it
    assert steps == 60 and "--lr-schedule-steps 120" in note
    assert lr_schedule_steps(cfg, {"lr_schedule_steps": 200, "args": {"steps": 60}}) == (200, None)


def _agree_cases(rank: int, world: int) -> dict[str, str]:
    from tp_ffn.train.consensus import agree

    out = {}
    cases = {
        "value": lambda: agree(
            lambda: "step_10" if rank == 0 else "nothing", what="the newest checkpoint", describe=str
        ),
        "same value": lambda: agree(lambda: 7, what="x", describe=str),
        "error on one": lambda: agree(lambda: _raise_if(rank == 1, "--data: no such file: x"), what="--data"),
        "same error": lambda: agree(lambda: _raise_if(True, "bad"), what="y"),
    }
    for name, case in cases.items():
        try:
            out[name] = f"value {case()!r}"
        except UsageError as e:
            out[name] = f"UsageError {e} agreed={e.agreed}"
    try:  # a bug (not a UsageError) on one rank: re-raised there, named on the others, nobody waits
        agree(lambda: _raise_if(rank == 1, "boom", OSError), what="z")
    except (OSError, RuntimeError) as e:
        out["crash"] = f"{type(e).__name__} {e}"
    return out


def _raise_if(cond: bool, message: str, kind: type[Exception] = UsageError) -> None:
    if cond:
        raise kind(message)


@pytest.mark.timeout(60)
def test_agree_compares_what_each_rank_found():
    r0, r1 = run_ranks(2, _agree_cases, timeout=30)
    for got in (r0, r1):
        assert got["value"] == (
            "UsageError the ranks disagree about the newest checkpoint: rank 0: step_10; rank 1: nothing agreed=True"
        )
        assert got["same value"] == "value 7"
        assert got["error on one"] == (
            "UsageError the ranks disagree about --data: rank 0: no error; rank 1: --data: no such file: x agreed=True"
        )
        assert got["same error"] == "UsageError bad agreed=True"
    assert r0["crash"] == "RuntimeError rank 1 failed while checking z: OSError: boom" and r1["crash"] == "OSError boom"


@pytest.mark.slow
def test_quiet_ranks_give_the_printing_rank_time_under_torchrun(monkeypatch, capsys):
    """torchrun stops every worker once one exits: a rank that prints nothing must not exit at once,
    or the rank that prints the agreed error can be killed before its line is out."""
    from tp_ffn.train import consensus
    from tp_ffn.train.config import UsageError

    slept: list[float] = []
    monkeypatch.setattr(consensus.time, "sleep", slept.append)
    error = UsageError("checkpoint X is damaged", agreed=True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    for rank, lines, pauses in (("0", 1, []), ("1", 0, [consensus.QUIET_RANK_GRACE_S])):
        slept.clear()
        monkeypatch.setenv("RANK", rank)
        consensus.report_error("train.py", error)
        assert len(capsys.readouterr().err.splitlines()) == lines and slept == pauses, rank
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # plain python or in-process ranks: no pause
    slept.clear()
    consensus.report_error("train.py", error)
    assert slept == []
