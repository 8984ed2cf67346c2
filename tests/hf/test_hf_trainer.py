"""transformers.Trainer on a tp_ffn.hf model under torchrun (tests/support/hf_trainer_job.py), against the dense model
trained by a Trainer in one process with the same global batch.

Float32 (what users train on CPU and GPU), AdamW with weight decay, clipping on (max_grad_norm below the
gradient norms). Tolerances from the issue: per-step losses 1e-5 relative, final weights 1e-4 (relative to
each tensor's largest element); both cover float32 sums taken in another order across ranks, and fail for
any real fault (a batch seen by the wrong rank changes the loss in the first digits, a per-rank clipping norm
the gradient norm in the third).

prepare_trainer needs transformers >= 5: with 4.46.3 (the venv's) the test checks that it says so, and that
a plain Trainer still stops at its first forward; tests/hf/test_transformers5.py runs this file with 5.x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import tp_ffn.hf as tphf

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "support" / "hf_trainer_job.py"
FIVE = int(transformers.__version__.split(".")[0]) >= 5
needs_5 = pytest.mark.skipif(not FIVE, reason="prepare_trainer needs transformers >= 5 (test_transformers5.py)")


def _run(nproc: int, case: str, out: Path, *sizes: int, timeout: float = 400) -> list[dict]:
    """The job on ``nproc`` ranks (one plain process for 0); every rank's result for the first size."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
    ]  # fmt: skip
    cmd = [*launch, str(JOB), case, str(out), *map(str, sizes)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    files = sorted((out / str(sizes[0])).glob("result*.json"))
    assert len(files) == max(nproc, 1), files
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """The dense references (intermediate 37 for the prepared runs, 36 for the unprepared one)."""
    out = tmp_path_factory.mktemp("dense")
    _run(0, "dense", out, 37, 36)
    return out


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _weight_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    return {k: ((got[k] - v).abs().max() / v.abs().max()).item() for k, v in want.items()}


@pytest.mark.slow
@needs_5
@pytest.mark.timeout(500)
@pytest.mark.parametrize("world", [2, 4])
def test_trainer_equals_dense(world, dense, tmp_path):
    """TP=2 (world 2) and TP=2 x DP=2 (world 4), intermediate 37 (uneven shards): every rank logs the dense
    run's losses and gradient norms (the clipped norm is the dense model's), the eval loss is the dense one,
    and save_model writes the dense model's file, whose weights are the dense run's final weights."""
    results = _run(world, "tp", tmp_path, 37)
    ref = json.loads((dense / "37" / "result0.json").read_text())
    assert len(ref["loss"]) == 4
    for rank, got in enumerate(results):
        assert got["transformers"] == transformers.__version__
        assert _rel(got["loss"], ref["loss"]) < 1e-5, (rank, got["loss"], ref["loss"])
        assert _rel(got["grad_norm"], ref["grad_norm"]) < 1e-5, (rank, got["grad_norm"], ref["grad_norm"])
        assert abs(got["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"] < 1e-5, (rank, got, ref)
    assert all(n > 0.5 for n in ref["grad_norm"])  # the job's max_grad_norm: every step clips
    errs = _weight_errors(_weights(tmp_path / "37" / "model"), _weights(dense / "37" / "model"))
    assert max(errs.values()) < 1e-4, errs
    assert json.loads((tmp_path / "37" / "model" / "config.json").read_text())["intermediate_size"] == 37


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_plain_trainer_stops_at_its_first_forward(dense, tmp_path):
    """World 2, intermediate 36 (shards of equal shape, so DDP's own shape check passes). Before the guard a
    plain Trainer trained on without a word: rank 1 started from rank 0's shards (DDP's broadcast) and the
    losses and final weights are far from the dense run's. Now DDP's constructor raises one line saying to
    call prepare_trainer, on every rank, before its broadcast and before any step."""
    results = _run(2, "unprepared", tmp_path, 36)
    ref = json.loads((dense / "36" / "result0.json").read_text())
    for rank, got in enumerate(results):
        assert got["error"] is not None and "\n" not in got["error"], (rank, got)
        assert "call tp_ffn.hf.prepare_trainer(trainer) before trainer.train()" in got["error"], got["error"]
        assert got["global_step"] == 0, got
        unguarded = got["unguarded"]
        assert unguarded["global_step"] == 4
        assert unguarded["rank 0's shard at start"] and unguarded["own shard at start"] == (rank == 0), unguarded
        assert _rel(unguarded["loss"], ref["loss"]) > 1e-3, (unguarded["loss"], ref["loss"])
    errs = _weight_errors(_weights(tmp_path / "36" / "unguarded"), _weights(dense / "36" / "model"))
    assert max(errs.values()) > 1e-2, errs


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_plain_trainer_refused_where_shards_differ_in_shape(tmp_path):
    """World 3, intermediate 37 (shards of 13, 12 and 12 rows). Before, DDP's constructor stopped at its own
    shape check: "params[5] ... sizes [12, 32] appears not to match" on ranks 1 and 2, only "Connection
    closed by peer" on rank 0. Now every rank stops there with the one line saying to call prepare_trainer."""
    for rank, got in enumerate(_run(3, "refused", tmp_path, 37)):
        assert got["error"] is not None and "\n" not in got["error"], (rank, got)
        assert "call tp_ffn.hf.prepare_trainer(trainer) before trainer.train()" in got["error"], got["error"]
        assert "nothing was changed" in got["error"] and "[0, 1, 2]" in got["error"], got["error"]
        assert got["global_step"] == 0, got


@pytest.mark.skipif(FIVE, reason="the refusal of transformers < 5")
def test_prepare_trainer_needs_transformers_5():
    with pytest.raises(ImportError, match=r"prepare_trainer: needs transformers >= 5 .*got 4\."):
        tphf.prepare_trainer(object())


@needs_5
def test_prepare_trainer_refuses_a_dense_model(tmp_path):
    """One process: a model with no tensor-parallel block is a one-line ValueError naming the cure."""
    from support.hf_models import build
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=build("llama", dtype=torch.float32), args=args)
    with pytest.raises(ValueError, match=r"^trainer.model: LlamaForCausalLM has no tensor-parallel block; "):
        tphf.prepare_trainer(trainer)


@pytest.mark.slow
@needs_5
@pytest.mark.timeout(400)
def test_bench_script_smoke(tmp_path):
    """benchmarks/bench_hf_trainer.py at a tiny size: both roles run and the JSON holds their step times (the
    figures themselves are taken on a quiet machine, never here)."""
    out = tmp_path / "hf_trainer.json"
    cmd = [
        sys.executable, "benchmarks/bench_hf_trainer.py", "--hidden", "32", "--intermediate", "37", "--layers", "1",
        "--heads", "4", "--vocab", "64", "--seq", "8", "--global-batch", "2", "--steps", "2", "--warmup", "1",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["dense"]["step_s"]) == len(result["tp"]["step_s"]) == 2
    assert result["tp_over_dense"] > 0 and result["machine"]["transformers"] == transformers.__version__
    bad = subprocess.run([*cmd[:2], "--hidden", "30"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "--hidden: expected a multiple of --heads (16), got 30"
    ), bad.stderr
