"""tests/test_hf_moe.py once more, with transformers 5 (fused experts) first on sys.path.

The venv keeps the test extra's transformers 4.46.3 (experts as modules). transformers 5 goes into ``<venv>/hf5``:

    .venv/bin/python -m pip install --target .venv/hf5 'transformers==5.*'

and this test runs pytest on tests/test_hf_moe.py in a subprocess with that directory first on PYTHONPATH (the
rank pools it spawns inherit it). When the HF-stack work (tests/test_transformers5.py, which reruns every
tests/test_hf*.py under transformers 5) is merged, this file is redundant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF5 = Path(sys.prefix) / "hf5"


@pytest.mark.timeout(900)
def test_hf_moe_with_transformers_5():
    assert (HF5 / "transformers").is_dir(), (
        f"{HF5}: no transformers 5 there; install it with: {sys.executable} -m pip install --target {HF5} "
        "'transformers==5.*'"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HF5), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": "1",
    }
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version.startswith("5."), f"{HF5} holds transformers {version}, expected 5.x"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests/test_hf_moe.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=880, check=False)
    summary = proc.stdout[-6000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} with transformers {version}:\n{summary}\n{proc.stderr[-3000:]}"
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
