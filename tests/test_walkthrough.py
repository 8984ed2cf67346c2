"""The fine-tuning walk-through of docs/training.md, run as it is written (the bash block between the
``<!-- walkthrough -->`` markers), in a temporary directory: the loss on new text falls after
fine-tuning, sampling works, and transformers loads the export."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docpages import ROOT, page


def walkthrough_block() -> str:
    text = page("docs/training.md")
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)\n```\n<!-- /walkthrough -->", text, re.DOTALL)
    assert block, "docs/training.md has no walk-through block"
    return block.group(1)


@pytest.mark.timeout(900)
def test_docs_walkthrough(tmp_path):
    env = {
        **os.environ, "W": str(tmp_path / "walk"), "TP_FFN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough_block()], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=880, check=False,
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    evals = [float(v) for v in re.findall(r"^eval: .* val_loss ([\d.]+), val_ppl", out, re.MULTILINE)]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5, out
    assert re.search(r"^--- sample 1\nThe tokenizer", out, re.MULTILINE), out
    assert re.search(r"^transformers: The tokenizer", out, re.MULTILINE), out
    assert (tmp_path / "walk" / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "cache" / "tokens").is_dir(), "the token cache went to $TP_FFN_CACHE"
