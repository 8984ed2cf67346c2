"""The fine-tuning walk-through of docs/training.md, run as it is written (the bash block between the
``<!-- walkthrough -->`` markers), in a temporary directory: the loss on new text falls after
fine-tuning, sampling works, and transformers loads the export."""

from __future__ import annotations

import re

import pytest
from support.docblocks import ROOT, run_walkthrough


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docs_walkthrough(tmp_path):
    env = {"W": str(tmp_path / "walk"), "TP_FFN_CACHE": str(tmp_path / "cache")}
    out = run_walkthrough(ROOT / "docs" / "training.md", env, timeout=880).stdout
    evals = [float(v) for v in re.findall(r"^eval: .* val_loss ([\d.]+), val_ppl", out, re.MULTILINE)]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5, out
    assert re.search(r"^--- sample 1\nThe tokenizer", out, re.MULTILINE), out
    assert re.search(r"^transformers: The tokenizer", out, re.MULTILINE), out
    assert (tmp_path / "walk" / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "cache" / "tokens").is_dir(), "the token cache went to $TP_FFN_CACHE"
