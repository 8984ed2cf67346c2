"""docs/huggingface-lora.md's walk-through, run as it is written (the bash block between the
``<!-- walkthrough -->`` markers), in a temporary directory: a tiny random Llama made locally, LoRA on its MLP
trained by transformers.Trainer + tp_ffn.hf.prepare_trainer at TP=2 over two gloo ranks, the adapter saved by
trainer.save_model as PEFT's dense files and loaded onto the unparallelized model in one process, whose logits
are then the trained parallel model's.

prepare_trainer needs transformers >= 5: the block runs with the venv's transformers where that is 5.x, else
with the one ./scripts/test.sh installs into <venv>/hf5 (tests/hf/test_transformers5.py) first on PYTHONPATH.
Without either the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from support.docblocks import ROOT, run_walkthrough

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
HF5 = Path(sys.prefix) / "hf5"


def _transformers_5() -> tuple[str, ...]:
    """What to put first on PYTHONPATH for transformers 5 (nothing where the venv has it)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return ()
    if (HF5 / "transformers").is_dir():
        return (str(HF5),)
    reason = (
        f"prepare_trainer needs transformers >= 5: the venv has {transformers.__version__} and {HF5} holds none "
        "(./scripts/test.sh installs it there)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the LoRA walk-through: {reason}")
    pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lora_walkthrough(tmp_path):
    """Tolerance 1e-4 on logits of size ~1: float32, the sums across ranks in another order (seen: ~1e-6). The
    adapter must have moved the dense logits by far more (an adapter saved untrained, or not loaded, gives the
    base model's logits and fails the first check), and the Trainer's loss must have fallen. The block clips
    (max_grad_norm below the gradient norms): clipping by each rank's own norm, as before sharded LoRA factors
    were counted over the group, leaves the ranks' whole factors apart and the logits 5e-3 off."""
    walk = tmp_path / "walk"
    out = run_walkthrough(
        ROOT / "docs" / "huggingface-lora.md", {"W": str(walk)}, timeout=580, pythonpath=_transformers_5()
    ).stdout
    losses = re.search(r"^TP=2 Trainer \+ LoRA: loss ([\d.]+) -> ([\d.]+) in 24 steps$", out, re.M)
    first, last = float(losses.group(1)), float(losses.group(2))
    diff = float(re.search(r"^dense \+ adapter vs TP=2 logits: max difference (\S+)$", out, re.M).group(1))
    moved = float(re.search(r"^the adapter moved the dense logits by up to (\S+)$", out, re.M).group(1))
    assert diff < 1e-4, out
    assert moved > 0.1, out
    assert last < first - 0.3, out
    files = {p.name for p in (walk / "out" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert "model.safetensors" not in files, files  # the adapter, not a full model
