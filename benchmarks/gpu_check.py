"""Everything GPU-related about tp_ffn, checked and measured in one call on a machine with CUDA.

    benchmarks/gpu_check.sh OUT_DIR                  # what to run on the GPU machine (no install)
    python3 benchmarks/gpu_check.py OUT_DIR          # the same, with the repository on PYTHONPATH
    python3 benchmarks/gpu_check.py OUT_DIR --rehearse-on-cpu   # every part at tiny shapes on the CPU

Writes ``OUT_DIR/gpu_check.json`` (everything), ``OUT_DIR/gpu_check.md`` (the summary, for
docs/benchmarks.md) and ``OUT_DIR/gpu_check.log`` (each command and its output), rewritten after
every part so that what finished survives an interruption. Parts, in this order, each under its
own time limit and all of them within ``--deadline`` (420 s: an H200 session allows 8 minutes);
a part that fails or runs out of time is recorded as such and the next one runs:

=============== ==========================================================================================
tests           ``pytest -m cuda``: the equivalence suite on CUDA (tests/core/test_cuda.py: dense vs
                ParallelFeedForward vs emulation in fp32 and bf16, init CPU vs CUDA, autocast, inductor)
                and the SwiGLU's inductor kernel count (tests/core/test_swiglu.py)
parity          benchmarks/parity.py at world size 1 on NCCL (fp32, bf16), and at world size 2 with both
                ranks on cuda:0 through gloo (plain, sequence parallel): correctness, not speed
bench           benchmarks/bench.py in bf16 at the Llama-3-8B (4096, 14336) and Llama-2-70B (8192, 28672)
                FFN shapes, 8192 tokens, TP=1: dense and every mode, eager, as a fraction of the bf16
                GEMM rate measured in the same run; peak and saved memory per candidate
per-rank        the ``local`` shard and the default mode at TP = 1, 2, 4, 8 of those shapes on PyTorch's
                fake process group (no communication): one rank's compute, so the efficiency lost to
                the smaller GEMMs of a shard is known
train           scripts/train.py, preset gpt2-small (134 M parameters), bf16, 1 GPU, eager and --compile:
                tokens/s and, when the metrics lines carry it, MFU
bench-compiled  the bench again under torch.compile: dense, the default mode and the previous default
=============== ==========================================================================================

Without a CUDA device nothing runs (unless ``--rehearse-on-cpu``): the summary says so and the
exit status is 0. Otherwise the status is 1 when a part failed, else 0; bad arguments: 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "parity", "bench", "per-rank", "train", "bench-compiled")
# Seconds each part is planned to take with the default deadline (they scale with --deadline and add
# up to it). A part must end by the sum of its own budget and those before it, so time an earlier
# part leaves unused goes to the later ones, and nothing runs past the deadline.
BUDGETS = {"tests": 100, "parity": 45, "bench": 70, "per-rank": 80, "train": 85, "bench-compiled": 40}
# 7 minutes: with start-up and gpu_check.sh's backstop, the whole call stays under the 8 minutes of
# an H200 session.
DEADLINE_S = 420.0
MIN_USEFUL_S = 15  # a command given less than this is not started
NO_TIME = "no time left"
EAGER_CANDIDATES = "dense,tp-plain,tp-fused,tp-overlap,tp-fused-overlap,tp-autograd-act,torch-tp,fairscale"
# Under compile: dense, the default mode and the default before the two-tensor SwiGLU (whether the
# recomputation is free once inductor fuses it); cold compiles of more modes do not fit the time.
COMPILED_CANDIDATES = "dense,tp-overlap,tp-autograd-act"
FAKE_WORLDS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    tokens: int

    def args(self) -> list[str]:
        return ["--dim", str(self.dim), "--hidden-dim", str(self.hidden), "--tokens", str(self.tokens)]


GPU_SHAPES = (Shape("llama3-8b", 4096, 14336, 8192), Shape("llama2-70b", 8192, 28672, 8192))
CPU_SHAPES = (Shape("tiny", 64, 160, 64),)


@dataclass(frozen=True)
class CheckConfig:
    """What to run and where: ``device`` "cuda" on the GPU machine, "cpu" for a rehearsal at tiny
    shapes (the same commands, so the machinery is exercised where there is no GPU)."""

    out: Path
    device: str = "cuda"
    parts: tuple[str, ...] = PARTS
    deadline_s: float = DEADLINE_S
    python: str = sys.executable

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(
                f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got {unknown or 'none'}"
            )
        if not self.deadline_s > 0:
            raise ValueError(f"--deadline: expected seconds > 0, got {self.deadline_s}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device: expected cuda or cpu, got {self.device!r}")

    def budget(self, part: str) -> float:
        return BUDGETS[part] * self.deadline_s / DEADLINE_S

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return GPU_SHAPES if self.device == "cuda" else CPU_SHAPES

    @property
    def reps(self) -> list[str]:
        return ["--reps", "10", "--warmup", "2"] if self.device == "cuda" else ["--reps", "2", "--warmup", "1"]


@dataclass
class PartResult:
    """One part's outcome: ``status`` is pass, fail or skipped, ``reason`` says why when not pass."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proc:
    cmd: list[str]
    rc: int | None
    output: str
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def why(self) -> str:
        """One line: how the command ended and the last line of its output that says something."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln or ln.startswith(("FAIL", "E "))]
        last = (errors or lines or ["no output"])[-1]
        return f"exit status {self.rc}: {last[:300]}"


class Runner:
    """Runs commands under the part's and the whole check's time limits and logs them."""

    def __init__(self, cfg: CheckConfig, log_path: Path, scratch: Path) -> None:
        self.cfg, self.log_path, self.scratch = cfg, log_path, scratch
        self.start = time.monotonic()
        self.part_end = self.start + cfg.deadline_s

    def remaining(self) -> float:
        return min(self.start + self.cfg.deadline_s, self.part_end) - time.monotonic()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.cfg.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"
        return env

    def run(self, args: Sequence[str], budget: float | None = None) -> Proc:
        """``python args...`` in the repository root, killed (its whole process group) at
        ``min(budget, time left)``; raises ``TimeoutError`` when too little time is left to start."""
        timeout = self.remaining() if budget is None else min(budget, self.remaining())
        if timeout < MIN_USEFUL_S:
            raise TimeoutError(f"{NO_TIME} ({max(timeout, 0):.0f} s)")
        cmd = [self.cfg.python, *args]
        t = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            output = _kill(proc)
        result = Proc(cmd, proc.returncode, output or "", time.monotonic() - t, timed_out)
        with self.log_path.open("a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.write(result.output)
            log.write(f"[exit status {result.rc}{', timed out' if timed_out else ''}, {result.seconds:.1f} s]\n")
        return result


def _kill(proc: subprocess.Popen) -> str:
    """Terminate the command and everything it started (torchrun's ranks); its output so far."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            output, _ = proc.communicate(timeout=wait)
            return output or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


# --- the parts -------------------------------------------------------------------------------------


def part_tests(cfg: CheckConfig, run: Runner) -> PartResult:
    junit = run.scratch / "junit.xml"
    p = run.run([
        # -v: each test's line reaches the log as it ends, so a run cut at its time limit still shows
        # how far it got (the JUnit file is only written at the end).
        "-m", "pytest", "-m", "cuda", "-v", "--durations=10", "-p", "no:cacheprovider", f"--junitxml={junit}",
        "tests/core/test_cuda.py", "tests/core/test_swiglu.py",
    ])  # fmt: skip
    if not junit.exists():
        return PartResult("tests", "fail", p.why())
    details = junit_outcomes(junit.read_text())
    if p.timed_out or details["failed"]:
        return PartResult("tests", "fail", p.why(), details=details)
    if details["passed"] == 0:
        reasons = sorted({s["message"] for s in details["skipped_tests"]})
        return PartResult("tests", "skipped", f"no test ran: {'; '.join(reasons)[:300]}", details=details)
    if p.rc not in (0, None):
        return PartResult("tests", "fail", p.why(), details=details)
    return PartResult("tests", "pass", details=details)


def junit_outcomes(xml_text: str) -> dict[str, Any]:
    """Counts and per-test messages from pytest's JUnit XML."""
    out: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skipped_tests": []}
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif skipped is not None:
            out["skipped"] += 1
            out["skipped_tests"].append({"test": name, "message": (skipped.get("message") or "")[:200]})
        else:
            out["passed"] += 1
    return out


def parity_runs(cfg: CheckConfig) -> dict[str, list[str]]:
    """Label -> arguments: world size 1 on the device's own backend, world size 2 on one device
    through gloo (on the GPU machine both ranks share cuda:0)."""
    gpu = cfg.device == "cuda"
    one = ["--device", "cuda"] if gpu else ["--backend", "gloo", "--device", "cpu"]
    two = ["--backend", "gloo", "--device", "cuda:0" if gpu else "cpu"]
    single, shared = ("NCCL", "cuda:0") if gpu else ("gloo", "cpu")
    parity = "benchmarks/parity.py"
    return {
        f"W=1 {single} fp32": [parity, "--bias", *one],
        f"W=1 {single} bf16": [parity, "--bias", "--dtype", "bfloat16", "--activation", "gelu", *one],
        f"W=2 gloo on {shared} fp32": torchrun(2, parity, "--bias", "--hidden-dim", "687", *two),
        f"W=2 gloo on {shared} fp32, sequence parallel": torchrun(
            2, parity, "--bias", "--sequence-parallel", "--activation", "gelu_tanh", *two
        ),
    }


def part_parity(cfg: CheckConfig, run: Runner) -> PartResult:
    checks, results = {}, {}
    for label, args in parity_runs(cfg).items():
        try:
            p = run.run(args)
        except TimeoutError as e:
            checks[label] = {"passed": False, "seconds": 0, "why": str(e), "table": []}
            results[label] = {"error": str(e)}
            continue
        passed = p.ok and p.output.rstrip().endswith("PASS")
        table = [ln for ln in p.output.splitlines() if ln.startswith(("output", "input grad", "grad ", "collectives"))]
        checks[label] = {"passed": passed, "seconds": round(p.seconds, 1), "why": "" if passed else p.why()}
        checks[label]["table"] = table
        results[label] = {} if passed else {"error": p.why()}
    result = _from_subresults("parity", results)
    result.details = {"checks": checks}
    return result


def bench_rows(summary: dict) -> list[dict[str, Any]]:
    """The numbers worth a summary from one bench.json."""
    keep = ("name", "dtype", "median_ms", "gflops", "gemm_fraction", "vs_dense", "vs_tp-autograd-act", "vs_local")
    keep += ("peak_mib", "saved_mib", "note")
    return [{k: r[k] for k in keep if k in r} for r in summary["rows"]]


def run_bench(cfg: CheckConfig, run: Runner, label: str, extra: list[str], budget: float | None = None) -> dict:
    """One benchmarks/bench.py run (bf16); its summary, or ``{"error": ...}``."""
    out = run.scratch / label
    p = run.run(bench_command(cfg, extra, out), budget)
    if not (p.ok and (out / "bench.json").exists()):
        return {"error": p.why(), "seconds": round(p.seconds, 1)}
    return {**bench_summary(out / "bench.json"), "seconds": round(p.seconds, 1)}


def bench_command(cfg: CheckConfig, extra: list[str], out: Path) -> list[str]:
    return ["benchmarks/bench.py", "--dtype", "bfloat16", *cfg.reps, *extra, "--out", str(out)]


def bench_summary(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return {
        "gemm_rate_gflops": summary["gemm_rate_gflops"].get("bfloat16"),
        "device": summary["device"],
        "rows": bench_rows(summary),
    }


def _bench_part(cfg: CheckConfig, run: Runner, name: str, candidates: str, compiled: bool) -> PartResult:
    results = {}
    for i, shape in enumerate(cfg.shapes):
        share = run.remaining() / (len(cfg.shapes) - i)  # later shapes keep their share of the time
        extra = [*shape.args(), "--candidates", candidates] + (["--compile"] if compiled else [])
        try:
            results[shape.name] = run_bench(cfg, run, f"{name}-{shape.name}", extra, share)
        except TimeoutError as e:
            results[shape.name] = {"error": str(e)}
    return _from_subresults(name, results)


def _from_subresults(name: str, results: dict[str, dict]) -> PartResult:
    """pass when every run passed; skipped when none could start in time; fail otherwise (a run
    failed, or some ran and the rest found no time)."""
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    reason = "; ".join(f"{k}: {v}" for k, v in errors.items())
    if not errors:
        return PartResult(name, "pass", details=results)
    if all(e.startswith(NO_TIME) for e in errors.values()) and len(errors) == len(results):
        return PartResult(name, "skipped", reason, details=results)
    return PartResult(name, "fail", reason, details=results)


def part_bench(cfg: CheckConfig, run: Runner) -> PartResult:
    return _bench_part(cfg, run, "bench", EAGER_CANDIDATES, compiled=False)


def part_bench_compiled(cfg: CheckConfig, run: Runner) -> PartResult:
    return _bench_part(cfg, run, "bench-compiled", COMPILED_CANDIDATES, compiled=True)


def part_per_rank(cfg: CheckConfig, run: Runner) -> PartResult:
    """Per shape, one bench.py process runs every fake TP size in turn (``--fake-world 1,2,4,8``):
    CUDA and the libraries start once per shape, not once per size."""
    worlds = FAKE_WORLDS if cfg.device == "cuda" else (1, 2)
    results: dict[str, dict] = {}
    for i, shape in enumerate(cfg.shapes):
        label = f"fake-{shape.name}"
        extra = [*shape.args(), "--candidates", "local,tp-overlap", "--fake-world", ",".join(map(str, worlds))]
        try:
            p = run.run(bench_command(cfg, extra, run.scratch / label), run.remaining() / (len(cfg.shapes) - i))
            failure = None if p.ok else p.why()
        except TimeoutError as e:
            failure = str(e)
        for world in worlds:
            path = run.scratch / label / f"fake-{world}" / "bench.json"
            key = f"{shape.name} TP={world}"
            # A size that finished before a later one failed (or the time ran out) still counts.
            if path.exists():
                results[key] = bench_summary(path)
            else:
                results[key] = {"error": failure or "no result"}
    result = _from_subresults("per-rank", results)
    result.details = {"runs": results, "efficiency": per_rank_efficiency(results)}
    return result


def per_rank_efficiency(results: dict[str, dict]) -> list[dict[str, Any]]:
    """Per shape and TP size: one rank's ``local`` GFLOP/s against the same shape's at TP=1 (the
    whole block in one process), and the default mode's time against ``local``'s."""
    rate: dict[tuple[str, int], float] = {}
    rows = []
    for key, res in results.items():
        shape, world = key.rsplit(" TP=", 1)
        by_name = {r["name"]: r for r in res.get("rows", []) if "median_ms" in r}
        if "local" not in by_name:
            continue
        local = by_name["local"]
        rate[(shape, int(world))] = local["gflops"]
        row = {"shape": shape, "tp": int(world), "local_ms": local["median_ms"], "local_gflops": local["gflops"]}
        row["gemm_fraction"] = local["gemm_fraction"]
        if "tp-overlap" in by_name:
            row["default_vs_local"] = by_name["tp-overlap"]["vs_local"]
        rows.append(row)
    for row in rows:
        base = rate.get((row["shape"], 1))
        row["of_tp1_rate"] = None if not base else row["local_gflops"] / base
    return rows


def train_runs(cfg: CheckConfig) -> dict[str, list[str]]:
    if cfg.device == "cuda":
        common = ["--preset", "gpt2-small", "--dtype", "bfloat16", "--steps", "30", "--seq-len", "1024"]
        common += ["--batch-size", "16", "--warmup-steps", "5"]
    else:
        common = [
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--corpus-bytes",
            "200000",
        ]
        common += ["--val-sequences", "2", "--warmup-steps", "1"]
    common += ["--tp", "1", "--val-every", "0", "--no-progress"]
    return {"eager": common, "compiled": [*common, "--compile"]}


def train_metrics(lines: list[dict[str, Any]], skip: int = 3) -> dict[str, Any]:
    """Median tokens/s (and MFU) over the steps after the first ``skip`` (warm-up, compilation)."""
    steps = [ln for ln in lines if "tokens_per_s" in ln]
    timed = steps[skip:] or steps
    out: dict[str, Any] = {"steps": len(steps), "timed_steps": len(timed)}
    if timed:
        out["tokens_per_s"] = statistics.median(ln["tokens_per_s"] for ln in timed)
        out["final_loss"] = steps[-1]["loss"]
    # train.py's step lines carry "mfu", against the GEMM rate it probes at start-up in the run's
    # dtype (bf16 for these runs); None only if no line has it.
    mfus = [ln["mfu"] for ln in timed if ln.get("mfu") is not None]
    out["mfu"] = statistics.median(mfus) if mfus else None
    return out


def part_train(cfg: CheckConfig, run: Runner) -> PartResult:
    results: dict[str, dict] = {}
    runs = train_runs(cfg)
    for i, (label, args) in enumerate(runs.items()):
        metrics = run.scratch / f"train-{label}" / "metrics.jsonl"
        try:
            p = run.run(["scripts/train.py", *args, "--metrics", str(metrics)], run.remaining() / (len(runs) - i))
        except TimeoutError as e:
            results[label] = {"error": str(e)}
            continue
        if not (p.ok and metrics.exists()):
            results[label] = {"error": p.why(), "seconds": round(p.seconds, 1)}
            continue
        lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        results[label] = {**train_metrics(lines), "seconds": round(p.seconds, 1)}
        header = [ln for ln in p.output.splitlines() if ln.startswith("tp_ffn train:")]
        results[label]["header"] = header[0] if header else ""
    return _from_subresults("train", results)


PART_FUNCTIONS: dict[str, Callable[[CheckConfig, Runner], PartResult]] = {
    "tests": part_tests,
    "parity": part_parity,
    "bench": part_bench,
    "per-rank": part_per_rank,
    "train": part_train,
    "bench-compiled": part_bench_compiled,
}


# --- the environment and the report ---------------------------------------------------------------


def probe_environment() -> dict[str, Any]:
    """What this machine has; ``cuda`` False (with ``reason``) when there is no device to check."""
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "commit": _commit()}
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means there is nothing to run
        return {**env, "torch": None, "cuda": False, "reason": f"torch is not importable: {e}"}
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    try:
        import fairscale  # noqa: F401

        env["fairscale"] = True
    except ImportError:
        env["fairscale"] = False
    if not torch.cuda.is_available():
        return {
            **env,
            "cuda": False,
            "reason": f"no CUDA device (torch.cuda.is_available() is False, torch {torch.__version__})",
        }
    # Triton builds a small C launcher on its first compile: without a C compiler or Python's
    # headers every compiled test and run fails, and this says why.
    env["c_compiler"] = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    env["python_headers"] = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    props = torch.cuda.get_device_properties(0)
    env.update(
        cuda=True, device=props.name, device_count=torch.cuda.device_count(),
        capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
    )  # fmt: skip
    return env


def _commit() -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# tp_ffn GPU check", ""]
    where = env.get("device") or "no CUDA device"
    lines.append(
        f"{report['started']}, {where}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"Python {env['python']}, fairscale {'present' if env.get('fairscale') else 'absent'}, commit {env['commit']}; "
        f"{report['total_s']:.0f} s of a {report['deadline_s']:.0f} s deadline."
    )
    if report.get("rehearsal"):
        lines.append("\nRehearsal on the CPU at tiny shapes: the machinery, not GPU figures.")
    if not env.get("cuda") and not report.get("rehearsal"):
        lines += ["", f"**Nothing was run: {env['reason']}.**"]
    lines += ["", "| part | status | seconds | reason |", "|---|---|---:|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['reason'] or ''} |")
    for p in report["parts"]:
        section = _SECTIONS.get(p["name"])
        if section and p["details"]:
            lines += ["", *section(p["details"])]
    return "\n".join(lines) + "\n"


def _md_tests(d: dict) -> list[str]:
    out = ["## tests (`pytest -m cuda`)", "", f"{d['passed']} passed, {d['failed']} failed, {d['skipped']} skipped."]
    out += [f"- FAILED {f['test']}: {f['message'][:200]}" for f in d["failures"]]
    return out


def _md_parity(d: dict) -> list[str]:
    out = ["## parity (benchmarks/parity.py)", "", "| run | result | seconds |", "|---|---|---:|"]
    for label, c in d["checks"].items():
        out.append(f"| {label} | {'PASS' if c['passed'] else 'FAIL: ' + c['why']} | {c['seconds']} |")
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _md_bench(title: str) -> Callable[[dict], list[str]]:
    def section(d: dict) -> list[str]:
        out = [f"## {title}"]
        for shape, res in d.items():
            out += ["", f"### {shape}"]
            if "error" in res:
                out.append(f"failed: {res['error']}")
                continue
            out.append(
                f"bf16 GEMM rate measured in the run: {res['gemm_rate_gflops'] / 1e3:.1f} TFLOP/s ({res['device']})"
            )
            out += [
                "",
                "| candidate | median ms | TFLOP/s | of GEMM rate | vs dense | vs tp-autograd-act | peak MiB | saved MiB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in res["rows"]:
                if "median_ms" not in r:
                    out.append(f"| {r['name']} | skipped: {r.get('note', '')} |||||||")
                    continue
                out.append(
                    f"| {r['name']} | {r['median_ms']:.2f} | {r['gflops'] / 1e3:.1f} | {r['gemm_fraction']:.2f} "
                    f"| {_fmt(r.get('vs_dense'))} | {_fmt(r.get('vs_tp-autograd-act'))} | {r['peak_mib']:.0f} "
                    f"| {r['saved_mib']:.0f} |"
                )
        return out

    return section


def _md_per_rank(d: dict) -> list[str]:
    out = ["## per-rank compute on the fake process group (bf16)", ""]
    out += ["| shape | TP | local ms | TFLOP/s per rank | of GEMM rate | of the TP=1 rate | default mode vs local |"]
    out += ["|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["efficiency"]:
        out.append(
            f"| {r['shape']} | {r['tp']} | {r['local_ms']:.2f} | {r['local_gflops'] / 1e3:.1f} | {r['gemm_fraction']:.2f} "
            f"| {_fmt(r['of_tp1_rate'])} | {_fmt(r.get('default_vs_local'))} |"
        )
    errors = [f"- {k}: {v['error']}" for k, v in d["runs"].items() if "error" in v]
    return out + errors


def _md_train(d: dict) -> list[str]:
    out = ["## train (scripts/train.py, one process)", "", "| run | tokens/s | MFU | final loss | steps | seconds |"]
    out.append("|---|---:|---:|---:|---:|---:|")
    for label, r in d.items():
        if "error" in r:
            out.append(f"| {label} | failed: {r['error']} |||||")
            continue
        mfu = "not reported" if r["mfu"] is None else f"{r['mfu']:.3f}"
        out.append(
            f"| {label} | {_fmt(r.get('tokens_per_s'), ',.0f')} | {mfu} | {_fmt(r.get('final_loss'), '.3f')} "
            f"| {r['steps']} | {r['seconds']} |"
        )
    headers = [r["header"] for r in d.values() if r.get("header")]
    return out + ([f"\n`{headers[0]}`"] if headers else [])


_SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "tests": _md_tests,
    "parity": _md_parity,
    "bench": _md_bench("bench (bf16 autocast, TP=1, eager)"),
    "per-rank": _md_per_rank,
    "train": _md_train,
    "bench-compiled": _md_bench("bench (bf16 autocast, TP=1, torch.compile)"),
}


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


def check(cfg: CheckConfig) -> int:
    """Run the parts; write the report after each. Exit status: 0, or 1 when a part failed."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out / "gpu_check.log"
    env = probe_environment()
    runnable = env.get("cuda") or cfg.device == "cpu"
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": env, "rehearsal": cfg.device == "cpu",
        "deadline_s": cfg.deadline_s, "total_s": 0.0, "parts": [],
    }  # fmt: skip
    log_path.write_text(f"tp_ffn GPU check, {report['started']}\n{json.dumps(env)}\n")
    if env.get("torch") is None:
        runnable = False
    print(f"gpu_check: {env.get('device') or env['reason']}{'' if runnable else ': nothing to run'}", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tp_ffn_gpu_check_") as scratch:
        runner = Runner(cfg, log_path, Path(scratch))
        boundary = 0.0
        for name in cfg.parts:
            t = time.monotonic()
            boundary += cfg.budget(name)
            if not runnable:
                result = PartResult(name, "skipped", env["reason"])
            else:
                runner.part_end = runner.start + boundary  # slack from earlier parts carries over
                try:
                    result = PART_FUNCTIONS[name](cfg, runner)
                except TimeoutError as e:
                    result = PartResult(name, "skipped", str(e))
                except Exception as e:  # noqa: BLE001 - a broken part is recorded; the next one runs
                    result = PartResult(name, "fail", f"{type(e).__name__}: {e}")
            result.seconds = round(time.monotonic() - t, 1)
            report["parts"].append(asdict(result))
            report["total_s"] = round(time.monotonic() - t0, 1)
            write_report(cfg.out, report)
            if runnable:
                print(f"gpu_check: {name}: {result.status} {result.reason}".rstrip(), flush=True)
    print(f"gpu_check: wrote {cfg.out / 'gpu_check.md'}, {cfg.out / 'gpu_check.json'} and {log_path}", flush=True)
    if env.get("torch") is None:
        return 1
    return 1 if any(p["status"] == "fail" for p in report["parts"]) else 0


def parse_args(argv: list[str] | None = None) -> CheckConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument(
        "--deadline",
        type=float,
        help=f"seconds for everything (default {DEADLINE_S:.0f}; 1200 with --rehearse-on-cpu); part budgets scale with it",
    )
    p.add_argument("--rehearse-on-cpu", action="store_true", help="run every part on the CPU at tiny shapes")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR {out}: expected a directory, got a file")
    if (out / "gpu_check.json").exists():
        raise ValueError(
            f"OUT_DIR {out}: already holds a gpu_check.json; choose another directory (nothing was overwritten)"
        )
    parts = tuple(s for s in a.parts.split(",") if s)
    deadline = a.deadline if a.deadline is not None else (1200.0 if a.rehearse_on_cpu else DEADLINE_S)
    return CheckConfig(out, "cpu" if a.rehearse_on_cpu else "cuda", parts, deadline)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"gpu_check.py: {e}", file=sys.stderr)
        return 2
    return check(cfg)


if __name__ == "__main__":
    sys.exit(main())
