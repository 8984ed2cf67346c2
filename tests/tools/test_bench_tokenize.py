"""benchmarks/bench_tokenize.py makes its three tokenizers and measures each (correctness of the script
only: timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_tokenize_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "benchmarks/bench_tokenize.py",
        "--mb",
        "0.1",
        "--vocab",
        "400",
        "--json",
        str(tmp_path / "r.json"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {row["tokenizer"]: row for row in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(results) == {"hf", "tiktoken", "sentencepiece"}
    for row in results.values():
        assert row["mb"] == pytest.approx(0.1) and 0 < row["tokens"] < 100_000 and row["build_mb_per_s"] > 0
    # The tiktoken ranks are the HF BPE's merges: the two split the text into about as many tokens.
    assert abs(results["tiktoken"]["tokens"] - results["hf"]["tokens"]) < 0.2 * results["hf"]["tokens"]
