"""The checkpoint round trip under the machine's own Python as well as the development one.

How an interpreter pickles some objects depends on its version, not on torch (an enum member by name
in Python 3.11.0-3.11.x, paths as ``pathlib._local`` from 3.13: tests/train/test_checkpoint_security.py),
so a checkpoint written by one Python must be read by the other, and each must read its own. The
system's ``python3`` (the first on ``getconf PATH``; on Debian 12 its 3.11.2, the one a newcomer
has) gets a virtual environment made by scripts/bootstrap.sh, with the same torch release, in
``.venv-system`` (kept between runs; the bootstrap's stamp makes a second run a check). Then, with
one ``--ckpt-dir``, each step read by the other interpreter:

    development: train steps 1-2 at TP=2            (torchrun, 2 gloo ranks)
    system:      --resume to step 4                 reads the development index, writes its own
    system:      sample.py, convert_checkpoint.py   read the system's own index
    development: --resume to step 6                 reads the system's index

and the losses equal those of one uninterrupted run (1e-6). Skipped, saying so, where no system
Python 3.10+ exists or it is the interpreter running the suite (then every test is this test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-system"
TRAIN = [
    "--preset", "tiny", "--model-args", "n_layers=1", "--tp", "2", "--seq-len", "16", "--batch-size", "2",
    "--corpus-bytes", "20000", "--val-every", "0", "--warmup-steps", "1", "--seed", "0", "--no-progress",
    "--ckpt-every", "2", "--lr-schedule-steps", "6",  # one schedule for the runs that stop early and the straight one
]  # fmt: skip


def _system_python() -> str | None:
    return shutil.which("python3", path=os.confstr("CS_PATH"))


def _version(python: str) -> tuple[int, ...]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:3])"], capture_output=True, text=True, check=True)
    return tuple(map(int, out.stdout.split()))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(python: str, *args: str, timeout: float = 240) -> str:
    r = subprocess.run([python, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{python} {' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _train(python: str, ckpt: Path, steps: int, *extra: str) -> None:
    _run(python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py", *TRAIN,
         "--steps", str(steps), "--ckpt-dir", str(ckpt), "--metrics", str(ckpt / "metrics.jsonl"), *extra)  # fmt: skip


def _losses(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def system_python() -> str:
    python = _system_python()
    if python is None:
        pytest.skip("no python3 on the system's own PATH (getconf PATH)")
    version = _version(python)
    if version < (3, 10):
        pytest.skip(f"the system's python3 is {'.'.join(map(str, version))}, older than the 3.10 this package needs")
    if version == tuple(sys.version_info[:3]) and Path(sys.base_prefix).resolve() == Path(
        subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, check=True).stdout.strip()
    ).resolve():
        pytest.skip(f"the suite itself runs under the system's python3 ({python}): every checkpoint test is this test")
    torch_version = torch.__version__.split("+")[0]
    env = {**_env(), "PYTHON": python, "VENV": str(VENV), "TORCH_VERSION": torch_version}
    r = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"bootstrap of {VENV} with {python} failed:\n{r.stderr[-3000:]}"
    venv_python = str(VENV / "bin" / "python")
    got = _run(venv_python, "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)").split()
    assert got == [".".join(map(str, version)), torch.__version__], got
    return venv_python


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_checkpoints_cross_between_the_system_and_the_development_python(system_python, tmp_path):
    here = sys.executable
    mixed, straight = tmp_path / "mixed", tmp_path / "straight"
    _train(here, mixed, 2)
    _train(system_python, mixed, 4, "--resume")
    out = _run(system_python, "scripts/sample.py", "--ckpt-dir", str(mixed), "--max-new-tokens", "4", "--num-samples", "1")
    assert out.strip(), "sample.py printed nothing"
    _run(system_python, "scripts/convert_checkpoint.py", "--from", "train", "--to", "hf", str(mixed), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()
    _train(here, mixed, 6, "--resume")
    _train(here, straight, 6)
    got, want = _losses(mixed / "metrics.jsonl"), _losses(straight / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 7)), (got, want)
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), (got, want)
