"""benchmarks/gpu_check.sh and gpu_check.py where there is no GPU: the fallback (what CI runs), and the
driver's Python on the CPU: the parts' commands, parsing, time limits and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/gpu_check.sh"])  # the old path: a wrapper
def test_fallback_without_cuda(tmp_path, script):
    """The shell script as is: finds no GPU (none is visible), says so, writes a summary saying so
    and exits 0; a second run into the same directory is refused and overwrites nothing."""
    out = tmp_path / "check"
    env = _env(CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA device" in r.stdout and "nothing to run" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["cuda"] is False
    assert [p["name"] for p in report["parts"]] == list(gc.PARTS)
    assert all(p["status"] == "skipped" and "no CUDA device" in p["reason"] for p in report["parts"])
    assert "**Nothing was run: no CUDA device" in (out / "gpu_check.md").read_text()
    before = (out / "gpu_check.json").read_bytes()
    r = subprocess.run([script, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and "already holds a gpu_check.json" in r.stderr
    assert (out / "gpu_check.json").read_bytes() == before


def test_bad_arguments_are_one_line_and_status_2(tmp_path, capsys):
    assert gc.main([str(tmp_path / "a"), "--parts", "tests,bogus"]) == 2
    assert "--parts: expected a comma-separated subset" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert gc.main([str(tmp_path / "file")]) == 2
    assert "expected a directory, got a file" in capsys.readouterr().err


def test_without_torch_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    env = gc.probe_environment()
    assert env["torch"] is None and env["cuda"] is False and "torch is not importable" in env["reason"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rehearsal_of_tests_and_bench_on_cpu(tmp_path):
    """The driver end to end on the CPU at a tiny shape: pytest -m cuda (all skipped here), the
    bench, and the per-rank runs (every fake TP size in one bench.py process); the report has the
    bench's rows with the GEMM-rate fraction and memory columns, and each size's efficiency."""
    out = tmp_path / "rehearsal"
    cmd = [sys.executable, "benchmarks/gpu_check.py", str(out), "--rehearse-on-cpu", "--parts", "tests,bench,per-rank"]
    env = _env(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    tests, bench, per_rank = report["parts"]
    assert per_rank["status"] == "pass", per_rank
    assert set(per_rank["details"]["runs"]) == {"tiny TP=1", "tiny TP=2"}
    efficiency = {row["tp"]: row for row in per_rank["details"]["efficiency"]}
    assert efficiency[1]["of_tp1_rate"] == 1.0 and efficiency[2]["of_tp1_rate"] > 0
    assert tests["status"] == "skipped" and "no CUDA device" in tests["reason"]
    assert tests["details"]["passed"] == 0 and tests["details"]["skipped"] > 10
    assert bench["status"] == "pass", bench
    rows = {row["name"]: row for row in bench["details"]["tiny"]["rows"]}
    assert {"dense", "tp-overlap", "tp-autograd-act"} <= set(rows)
    assert rows["tp-overlap"]["saved_mib"] < rows["tp-autograd-act"]["saved_mib"]
    assert 0 < rows["tp-overlap"]["gemm_fraction"]
    md = (out / "gpu_check.md").read_text()
    assert "Rehearsal on the CPU" in md and "| tp-overlap |" in md
    assert "$ " in (out / "gpu_check.log").read_text()  # every command is logged


def _runner(tmp_path: Path, deadline: float = 450.0) -> gc.Runner:
    cfg = gc.CheckConfig(tmp_path, device="cpu", deadline_s=deadline)
    return gc.Runner(cfg, tmp_path / "gpu_check.log", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_runner_kills_the_whole_process_group_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_USEFUL_S", 0.5)
    pid_file = tmp_path / "grandchild"
    child = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)"
    )
    t = time.monotonic()
    p = _runner(tmp_path).run(["-c", child], budget=3)
    assert p.timed_out and not p.ok and "timed out after" in p.why()
    assert time.monotonic() - t < 30
    assert "started" in p.output
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")  # torchrun's ranks go with it
    time.sleep(0.5)
    assert not grandchild.exists() or grandchild.read_text().split(") ")[1].startswith("Z")  # gone, or a zombie


def test_no_time_left_skips_instead_of_starting(tmp_path):
    run = _runner(tmp_path, deadline=5)
    with pytest.raises(TimeoutError, match="no time left"):
        run.run(["-c", "print(1)"])
    cfg = gc.CheckConfig(tmp_path, device="cpu", deadline_s=5)
    result = gc.part_bench(cfg, run)
    assert result.status == "skipped" and "no time left" in result.reason


def test_parity_part_reads_pass_and_fail(tmp_path, monkeypatch):
    runs = {
        "good": ["-c", "print('output 1e-7'); print('PASS')"],
        "bad": ["-c", "import sys; print('output 0.5  FAIL'); print('FAIL: see the rows'); sys.exit(1)"],
    }
    monkeypatch.setattr(gc, "parity_runs", lambda cfg: runs)
    result = gc.part_parity(gc.CheckConfig(tmp_path, device="cpu"), _runner(tmp_path))
    assert result.status == "fail" and result.reason.startswith("bad: exit status 1")
    assert result.details["checks"]["good"]["passed"] and result.details["checks"]["good"]["table"] == ["output 1e-7"]
    monkeypatch.setattr(gc, "parity_runs", lambda cfg: {"good": runs["good"]})
    assert gc.part_parity(gc.CheckConfig(tmp_path, device="cpu"), _runner(tmp_path)).status == "pass"


@pytest.mark.slow
def test_commands_on_the_gpu_machine(tmp_path):
    cfg = gc.CheckConfig(tmp_path)
    runs = {k: " ".join(v) for k, v in gc.parity_runs(cfg).items()}
    assert runs["W=1 NCCL fp32"].endswith("--device cuda") and "torch.distributed.run" not in runs["W=1 NCCL fp32"]
    two = runs["W=2 gloo on cuda:0 fp32, sequence parallel"]
    assert "--nproc_per_node=2" in two and "--backend gloo --device cuda:0" in two and "--sequence-parallel" in two
    assert [(s.dim, s.hidden, s.tokens) for s in cfg.shapes] == [(4096, 14336, 8192), (8192, 28672, 8192)]
    train = {k: " ".join(v) for k, v in gc.train_runs(cfg).items()}
    assert "--preset gpt2-small --dtype bfloat16" in train["eager"] and "--compile" not in train["eager"]
    assert train["compiled"].endswith("--compile")
    assert sum(cfg.budget(p) for p in gc.PARTS) == pytest.approx(cfg.deadline_s)  # each part's end is planned
    assert gc.CheckConfig(tmp_path, deadline_s=2 * gc.DEADLINE_S).budget("tests") == 2 * gc.BUDGETS["tests"]


def test_junit_outcomes():
    xml = """<testsuites><testsuite>
      <testcase classname="tests.test_cuda" name="test_a"/>
      <testcase classname="tests.test_cuda" name="test_b"><failure message="assert 0.1 &lt; 1e-05">tb</failure></testcase>
      <testcase classname="tests.test_cuda" name="test_c"><error message="fixture broke">tb</error></testcase>
      <testcase classname="tests.test_swiglu" name="test_d"><skipped message="no CUDA device"/></testcase>
    </testsuite></testsuites>"""
    got = gc.junit_outcomes(xml)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 2, 1)
    assert got["failures"][0] == {"test": "tests.test_cuda::test_b", "message": "assert 0.1 < 1e-05"}
    assert got["skipped_tests"][0]["message"] == "no CUDA device"


def test_train_metrics_and_the_mfu_hook():
    lines = [{"step": i, "loss": 5.0 - i, "tokens_per_s": 100.0 * i} for i in range(1, 7)]
    lines.insert(3, {"step": 3, "val_loss": 2.0})
    got = gc.train_metrics(lines)
    assert got["steps"] == 6 and got["timed_steps"] == 3 and got["tokens_per_s"] == 500.0
    assert got["final_loss"] == -1.0 and got["mfu"] is None
    with_mfu = [{**ln, "mfu": 0.1 * ln["step"]} for ln in lines if "tokens_per_s" in ln]
    assert gc.train_metrics(with_mfu)["mfu"] == pytest.approx(0.5)


def test_per_rank_efficiency():
    def rows(local_ms: float, gflops: float) -> dict:
        return {
            "rows": [
                {"name": "local", "median_ms": local_ms, "gflops": gflops, "gemm_fraction": 0.8, "vs_local": 1.0},
                {"name": "tp-overlap", "median_ms": local_ms * 1.02, "gflops": gflops / 1.02, "vs_local": 1.02},
            ]
        }

    results = {"s TP=1": rows(8.0, 800.0), "s TP=4": rows(2.5, 640.0), "s TP=8": {"error": "timed out"}}
    eff = {r["tp"]: r for r in gc.per_rank_efficiency(results)}
    assert set(eff) == {1, 4}
    assert eff[1]["of_tp1_rate"] == 1.0 and eff[4]["of_tp1_rate"] == pytest.approx(0.8)
    assert eff[4]["default_vs_local"] == 1.02


def test_markdown_renders_every_section():
    bench = {
        "s": {
            "gemm_rate_gflops": 700e3,
            "device": "NVIDIA H200",
            "seconds": 9.0,
            "rows": [
                {"name": "tp-overlap", "median_ms": 12.3, "gflops": 600e3, "gemm_fraction": 0.86, "vs_dense": 1.01,
                 "vs_tp-autograd-act": 0.99, "peak_mib": 900.0, "saved_mib": 448.0},
                {"name": "fairscale", "note": "fairscale is not installed"},
            ],
        },
        "t": {"error": "timed out after 40 s"},
    }  # fmt: skip
    parts = [
        {"name": "tests", "status": "pass", "reason": "", "seconds": 50,
         "details": {"passed": 30, "failed": 0, "skipped": 1, "failures": [], "skipped_tests": []}},
        {"name": "parity", "status": "pass", "reason": "", "seconds": 30,
         "details": {"checks": {"W=1 NCCL fp32": {"passed": True, "seconds": 8.0, "why": "", "table": []}}}},
        {"name": "bench", "status": "fail", "reason": "t: timed out", "seconds": 80, "details": bench},
        {"name": "per-rank", "status": "pass", "reason": "", "seconds": 60, "details": {"runs": {}, "efficiency": [
            {"shape": "s", "tp": 2, "local_ms": 6.0, "local_gflops": 650e3, "gemm_fraction": 0.9, "of_tp1_rate": 0.95,
             "default_vs_local": 1.01}]}},
        {"name": "train", "status": "pass", "reason": "", "seconds": 90, "details": {
            "eager": {"steps": 30, "timed_steps": 27, "tokens_per_s": 2.5e5, "final_loss": 2.5, "mfu": None,
                      "seconds": 25.0, "header": "tp_ffn train: world 1"},
            "compiled": {"error": "timed out after 70 s"}}},
        {"name": "bench-compiled", "status": "skipped", "reason": "no time left (3 s)", "seconds": 0, "details": {}},
    ]  # fmt: skip
    env = {"python": "3.12", "commit": "abc", "torch": "2.11", "torch_cuda": "13.0", "cuda": True, "device": "H200"}
    report = {"started": "now", "environment": env, "deadline_s": 450, "total_s": 330, "parts": parts}
    md = gc.markdown(report)
    for text in (
        "| bench | fail | 80 | t: timed out |",
        "| tp-overlap | 12.30 | 600.0 | 0.86 | 1.010 | 0.990 | 900 | 448 |",
        "| fairscale | skipped: fairscale is not installed |",
        "failed: timed out after 40 s",
        "| s | 2 | 6.00 | 650.0 | 0.90 | 0.950 | 1.010 |",
        "| eager | 250,000 | not reported | 2.500 | 30 | 25.0 |",
        "| compiled | failed: timed out after 70 s |",
        "| W=1 NCCL fp32 | PASS | 8.0 |",
        "30 passed, 0 failed, 1 skipped.",
    ):
        assert text in md, text
    assert "Nothing was run" not in md
