"""benchmarks/bench_moe.py runs under torchrun and writes its JSON (correctness of the script only:
timings are never asserted)."""

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
def test_bench_moe_smoke(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["benchmarks/bench_moe.py"]
    cmd += ["--dim", "16", "--experts", "4", "--top-k", "2", "--hidden", "16", "--shared", "16", "--tokens", "32"]
    cmd += ["--reps", "2", "--warmup", "0", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "bench_moe_w2.json").read_text())
    rows = {row["name"]: row for row in summary["candidates"]}
    assert summary["reference"] == "hf-per-expert" and set(rows) == {"hf-per-expert", "moe", "moe-loop"}
    # Today's per-expert parallelization: one all-reduce each way per expert and for the shared expert.
    assert (
        rows["hf-per-expert"]["collectives_forward"]
        == rows["hf-per-expert"]["collectives_backward"]
        == {"all_reduce": 5}
    )
    for name in ("moe", "moe-loop"):
        assert rows[name]["collectives_forward"] == {"all_reduce": 1}
        assert rows[name]["collectives_backward"] == {"all_reduce": 2}
        # The same computation as HF's block, on the same weights and tokens.
        assert rows[name]["output_rel_diff_to_first"] < 1e-5
        assert rows[name]["saved_bytes_per_token"] < rows["hf-per-expert"]["saved_bytes_per_token"]
        assert rows[name]["paired_ratio_to_hf-per-expert"] > 0
    # fp32: forward [T, dim]; backward [T, dim] and the [T, k + 1] routing-weight gradients
    assert rows["moe"]["comm_bytes_per_step"] == 4 * 32 * (16 + 16 + 3)
