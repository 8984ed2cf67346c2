"""Run a documentation page's walk-through as it is written: the bash block between the
``<!-- walkthrough -->`` and ``<!-- /walkthrough -->`` markers, from the repository root, with the venv's
interpreter first on PATH and this checkout importable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def walkthrough_block(page: Path) -> str:
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)\n```\n<!-- /walkthrough -->", page.read_text(), re.DOTALL)
    assert block, f"{page} has no walk-through block"
    return block.group(1)


def run_walkthrough(
    page: Path, env: dict[str, str], timeout: float, pythonpath: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The block under ``bash -euo pipefail`` with ``env`` added and ``pythonpath`` (e.g. the directory holding
    transformers 5) before this checkout on ``PYTHONPATH``; its exit status is asserted to be 0."""
    env = {
        **os.environ, **env, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough_block(page)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r
