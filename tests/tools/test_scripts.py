"""benchmarks/parity.py under a real torchrun, and the bootstrap scripts' promises."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.docpages import block_after, page

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "benchmarks/parity.py",
    ]
    return _run(cmd + list(args))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_parity_under_torchrun_passes():
    r = _torchrun(
        2,
        "--dim",
        "32",
        "--hidden-dim",
        "77",
        "--bias",
        "--sequence-parallel",
        "--seq",
        "8",
        "--activation",
        "gelu_tanh",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2 (gloo on cpu)" in r.stdout
    assert "backward: all_gather 1, all_reduce 1, all_to_all 1" in r.stdout  # gloo's reduce-scatter: an all-to-all
    assert "rank 1: w1.weight [38, 32]" in r.stdout  # 77 over 2: 39 and 38
    assert r.stdout.rstrip().endswith("PASS")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_parity_fails_loudly():
    # An impossible tolerance must fail every row and the exit code (no test-only switch needed).
    r = _torchrun(2, "--dim", "16", "--hidden-dim", "24", "--rtol", "1e-30")
    assert r.returncode != 0
    assert "FAIL" in r.stdout
    r = _torchrun(2, "--dim", "16", "--hidden-dim", "24", "--sequence-parallel", "--seq", "5")
    assert r.returncode != 0
    assert "--seq: expected a multiple of the world size 2" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_docs_parity_example_runs_at_three_ranks_with_the_defaults():
    """The parity output docs/testing.md shows (3 ranks, --bias --sequence-parallel, default --seq) is
    what that command prints: the default sequence length splits over 3 ranks."""
    doc = page("docs/testing.md").splitlines()
    cmd = "torchrun --standalone --nproc_per_node 3 scripts/parity.py --bias --sequence-parallel"  # the page's path
    assert any(cmd in ln for ln in doc), cmd
    header = next(ln for ln in doc if ln.startswith("tp_ffn parity: world size 3"))
    shards = [ln for ln in doc if ln.startswith("  rank ") and ": w1.weight" in ln]
    r = _torchrun(3, "--bias", "--sequence-parallel")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == header
    assert shards and all(ln in r.stdout.splitlines() for ln in shards), shards
    assert r.stdout.rstrip().endswith("PASS")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_parity_without_torchrun_is_world_size_one():
    r = _run([sys.executable, "benchmarks/parity.py", "--dim", "16", "--hidden-dim", "24", "--bias"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "collectives  forward: none (expected none)" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_parity_backend_and_device_flags():
    r = _run(
        [
            sys.executable,
            "benchmarks/parity.py",
            "--dim",
            "8",
            "--hidden-dim",
            "12",
            "--backend",
            "gloo",
            "--device",
            "cpu",
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 1 (gloo on cpu)" in r.stdout
    r = _run([sys.executable, "benchmarks/parity.py", "--backend", "nccl", "--device", "cpu"])
    assert r.returncode == 2 and "--backend nccl: needs a CUDA device" in r.stderr
    r = _run([sys.executable, "benchmarks/parity.py", "--device", "gpu0"])
    assert r.returncode == 2 and "--device: expected auto, cpu, cuda or cuda:N" in r.stderr
    if not torch.cuda.is_available():
        r = _run([sys.executable, "benchmarks/parity.py", "--device", "cuda:0"])
        assert r.returncode == 2 and "--device cuda:0: CUDA is not available" in r.stderr


def test_readme_commands_and_ci_agree():
    readme = page("README.md")
    for cmd in ("./scripts/run.sh", "./scripts/test.sh"):
        assert cmd in readme
        assert os.access(ROOT / cmd, os.X_OK)
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'TORCH_VERSION="${TORCH_VERSION:-2.13.0}"' in bootstrap


def _torchrun_file(tmp_path: Path, code: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``code`` saved as block.py and run under torchrun on ``nproc`` CPU ranks."""
    (tmp_path / "block.py").write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "block.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_readme_block_example_prints_what_the_readme_shows(tmp_path):
    """The README's first example ("The block"), as written, on 2 CPU ranks: each rank holds half of
    w1, output and input gradient equal the dense block's to float32 round-off, one all-reduce each
    way; and the output at the top of the README is what it prints (error digits aside)."""
    code = block_after("README.md", "## The block", "python")
    r = _torchrun_file(tmp_path, code)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dim, hidden = (int(v) for v in re.search(r"dim: int = (\d+), hidden: int = (\d+)", code).groups())
    # Each rank prints one line; found by pattern, so two ranks' lines written into one pipe cannot merge them.
    got = sorted(re.findall(r"rank \d+: w1 .*?backward \d+", r.stdout))
    assert len(got) == 2, r.stdout[-3000:] + r.stderr[-3000:]
    for rank, line in enumerate(got):
        assert line.startswith(f"rank {rank}: w1 ({hidden // 2}, {dim}) of ({hidden}, {dim}),"), line
        assert line.endswith("all-reduces: forward 1, backward 1"), line
        errors = [float(e) for e in re.findall(r"(\d(?:\.\d+)?e[-+]\d+)", line)]
        assert len(errors) == 2 and all(e < 1e-5 for e in errors), line  # float32 against the dense block
    shown = sorted(ln for ln in block_after("README.md", "# tp_ffn", "console").splitlines() if ln.startswith("rank "))

    def digits_aside(lines: list[str]) -> list[str]:
        return [re.sub(r"\d(?:\.\d+)?e[-+]\d+", "E", ln) for ln in lines]

    assert digits_aside(shown) == digits_aside(got), (shown, got)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_docs_model_example_runs_on_two_cpu_ranks_and_splits(tmp_path):
    """docs/api.md's "In a model" code, as written, under torchrun on 2 CPU ranks: one TP group of
    2, so each rank holds half of w1 (a (2, 1) mesh would leave every rank the whole matrix)."""
    code = block_after("docs/api.md", "## In a model", "python")
    r = _torchrun_file(tmp_path, code)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from tp_ffn import llama_ffn_hidden_dim

    dim = int(re.search(r"dim: int = (\d+)", code).group(1))
    for rank in (0, 1):
        assert f"rank {rank}: w1 shard ({llama_ffn_hidden_dim(dim) // 2}, {dim})" in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_sh_trains_samples_and_names_each_file_once(tmp_path):
    """./scripts/run.sh (2 steps here): it trains, samples, prints the loss-curve line once, and its
    training header is the one the README shows for the same command."""
    venv = Path(sys.prefix)
    stamp = venv / ".tp_ffn-installed"
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().split()[0] != pyproject:
        pytest.skip("not run from an up-to-date bootstrap venv (run.sh would reinstall it)")
    env = {**os.environ, "VENV": str(venv), "STEPS": "2", "RUN_DIR": str(tmp_path / "run")}
    cmd = ["./scripts/run.sh", "--val-every", "1", "--val-sequences", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(ln.startswith("loss curve:") for ln in lines) == 1, r.stdout
    assert lines[-1].startswith("run directory: ") and (tmp_path / "run" / "metrics.png").exists()
    readme = page("README.md").splitlines()
    (header,) = [ln for ln in readme if ln.startswith("tp_ffn train: world 2 = dp 1 x tp 2")]
    assert header in lines, (header, lines[:3])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_docs_count_the_training_tests():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "train").glob("test_train_*.py"))
    r = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files], timeout=110)
    n = int(re.search(r"^(\d+) tests? collected", r.stdout, flags=re.MULTILINE).group(1))
    assert f"`tests/train/test_train_*.py` ({n} tests" in page("docs/testing.md"), n


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_exit_without_teardown_flushes_and_keeps_the_status():
    """The measurement scripts end with exit_without_teardown (os._exit: a gloo worker thread or the
    profiler's can abort the interpreter's teardown, see tp_ffn/shutdown.py). Into a pipe stdout is
    block-buffered, so without the flush this line is lost; the status must be the one given."""
    code = (
        "import torch\n"
        "from tp_ffn.diagnostics import profile_step\n"
        "from tp_ffn.shutdown import exit_without_teardown\n"
        "p = profile_step(lambda: torch.ones(64) + 1)\n"
        "print('peak', p.peak_bytes > 0)\n"
        "exit_without_teardown(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 3, r.stderr
    assert "peak True" in r.stdout
    for script in ("parity.py", "bench.py", "bench_parts.py", "hf_memory.py", "init_memory.py"):
        tail = (ROOT / "benchmarks" / script).read_text().rstrip().splitlines()[-1]
        assert tail.strip().startswith("exit_without_teardown(main())"), script


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_counting_collectives_leaves_no_thread_behind():
    """count_collectives (used by parity.py and in the test processes) starts no thread: the
    profiler's kineto thread, which it used before, could abort the interpreter's exit (SIGABRT on
    CI after the work was done). Run in a fresh process, where nothing has started kineto yet;
    Linux lists a process's threads in /proc/self/task."""
    if not Path("/proc/self/task").exists():
        pytest.skip("needs Linux /proc")
    code = (
        "import os, torch\n"
        "from tp_ffn.diagnostics import count_collectives\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "with count_collectives() as n:\n"
        "    torch.ones(4) + 1\n"
        "print(dict(n), len(os.listdir('/proc/self/task')) - before)\n"
    )
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "{} 0", r.stdout
