"""scripts/parity.py under a real torchrun, and the bootstrap scripts' promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
        "scripts/parity.py",
    ]
    return _run(cmd + list(args))


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
    assert "backward: all_gather 1, all_reduce 1, reduce_scatter 1" in r.stdout
    assert "rank 1: w1.weight [38, 32]" in r.stdout  # 77 over 2: 39 and 38
    assert r.stdout.rstrip().endswith("PASS")


@pytest.mark.timeout(200)
def test_parity_fails_loudly():
    # An impossible tolerance must fail every row and the exit code (no test-only switch needed).
    r = _torchrun(2, "--dim", "16", "--hidden-dim", "24", "--rtol", "1e-30")
    assert r.returncode != 0
    assert "FAIL" in r.stdout
    r = _torchrun(2, "--dim", "16", "--hidden-dim", "24", "--sequence-parallel", "--seq", "5")
    assert r.returncode != 0
    assert "--seq: expected a multiple of the world size 2" in r.stderr


@pytest.mark.timeout(120)
def test_parity_without_torchrun_is_world_size_one():
    r = _run([sys.executable, "scripts/parity.py", "--dim", "16", "--hidden-dim", "24", "--bias"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "collectives  forward: none (expected none)" in r.stdout


@pytest.mark.timeout(120)
def test_parity_backend_and_device_flags():
    r = _run(
        [
            sys.executable,
            "scripts/parity.py",
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
    r = _run([sys.executable, "scripts/parity.py", "--backend", "nccl", "--device", "cpu"])
    assert r.returncode == 2 and "--backend nccl: needs a CUDA device" in r.stderr
    r = _run([sys.executable, "scripts/parity.py", "--device", "gpu0"])
    assert r.returncode == 2 and "--device: expected auto, cpu, cuda or cuda:N" in r.stderr
    if not torch.cuda.is_available():
        r = _run([sys.executable, "scripts/parity.py", "--device", "cuda:0"])
        assert r.returncode == 2 and "--device cuda:0: CUDA is not available" in r.stderr


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    for cmd in ("./scripts/run.sh", "./scripts/test.sh"):
        assert cmd in readme
        assert os.access(ROOT / cmd, os.X_OK)
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"' in bootstrap
