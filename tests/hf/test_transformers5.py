"""The HF adapter's tests (tests/test_hf*.py) once more, with transformers 5 first on sys.path.

The venv keeps the test extra's transformers 4.46.3 (the last release with pretraining_tp, which
test_emulation.py holds tp_ffn's emulation against); users run 5.x, whose checkpoints, module layouts and
Trainer differ. ./scripts/test.sh installs the release pinned in tests/hf5-requirements.txt into
<venv>/hf5 (pip --target); this test runs pytest on those files in a subprocess with that directory first on
PYTHONPATH (the rank pools and torchrun jobs they spawn inherit it), and conftest.py stops that run at once
if it does not import the pinned release.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "tests" / "hf5-requirements.txt"
HF5 = Path(sys.prefix) / "hf5"


def _pinned() -> str:
    (version,) = re.findall(r"^transformers==(\S+)$", REQUIREMENTS.read_text(), flags=re.M)
    return version


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_hf_adapter_with_transformers_5():
    version = _pinned()
    assert version.startswith("5."), version
    assert (HF5 / "transformers").is_dir(), (
        f"{HF5}: no transformers {version} there; ./scripts/test.sh installs it (pip install --target {HF5} "
        f"-r {REQUIREMENTS.relative_to(ROOT)})"
    )
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "hf").glob("test_hf*.py"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HF5), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TP_FFN_EXPECT_TRANSFORMERS": version,
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short", "--show-capture=no"]
    proc = subprocess.run([*cmd, *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700)
    summary = proc.stdout[-3000:]
    failures = proc.stdout[proc.stdout.find("= FAILURES =") :][:8000] if "= FAILURES =" in proc.stdout else ""
    assert proc.returncode == 0, f"{' '.join(cmd)} with transformers {version}:\n{failures}\n{summary}\n{proc.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary), summary
    # Only the checks of what transformers 4 lacks may skip here; a file skipped whole would pass unseen.
    skipped = re.findall(r"^SKIPPED \[\d+\] (\S+): (.*)$", proc.stdout, flags=re.M)
    assert all("transformers < 5" in reason for _, reason in skipped), skipped
