"""docs/huggingface-lora.md's walk-through, run as it is written (the bash block between the
``<!-- walkthrough -->`` markers), in a temporary directory: LoRA trained at TP=2 over two gloo ranks, saved
as PEFT's files, loaded onto the dense model with plain transformers + PeftModel.from_pretrained, which then
has the parallel model's loss, well below the base model's."""

from __future__ import annotations

import re

import pytest
from docblocks import ROOT, run_walkthrough

pytest.importorskip("peft")


@pytest.mark.timeout(600)
def test_lora_walkthrough(tmp_path):
    out = run_walkthrough(ROOT / "docs" / "huggingface-lora.md", {"W": str(tmp_path / "walk")}, timeout=580).stdout
    tp = float(re.search(r"^tp=2 final loss ([\d.]+)$", out, re.MULTILINE).group(1))
    base = float(re.search(r"^dense base loss ([\d.]+)$", out, re.MULTILINE).group(1))
    adapted = float(re.search(r"^dense \+ adapter loss ([\d.]+)$", out, re.MULTILINE).group(1))
    assert abs(adapted - tp) < 1e-4 * tp, out  # float32: the order of sums across ranks
    assert adapted < base - 1.0, out
    files = {p.name for p in (tmp_path / "walk" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
