"""scripts/bench_pool.py: paired ratios of several bench.py runs, pooled (figures from made-up runs)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_pool", ROOT / "scripts" / "bench_pool.py")
bench_pool = importlib.util.module_from_spec(_spec)
sys.modules["bench_pool"] = bench_pool  # dataclasses look their module up there
_spec.loader.exec_module(bench_pool)


def _run(path: Path, cand: list[float], ref: list[float], dtype: str = "bfloat16") -> Path:
    rows = [
        {"name": "tp-overlap", "dtype": dtype, "times_ms": cand},
        {"name": "tp-autograd-act", "dtype": dtype, "times_ms": ref},
        {"name": "fairscale", "dtype": dtype, "note": "fairscale is not installed"},
    ]
    path.write_text(json.dumps({"config": {}, "rows": rows}))
    return path


def test_pools_the_rounds_of_every_run(tmp_path, capsys):
    # Run a: the candidate 2% faster in each round; run b: 4% slower. Ratios per round, not of medians.
    a = _run(tmp_path / "a.json", [98.0, 196.0, 294.0], [100.0, 200.0, 300.0])
    b = _run(tmp_path / "b.json", [104.0, 208.0], [100.0, 200.0])
    runs = [bench_pool.read_ratios(p, "tp-overlap", "tp-autograd-act", "bfloat16") for p in (a, b)]
    assert [r.median for r in runs] == pytest.approx([0.98, 1.04])
    pooled = bench_pool.pool(runs, "tp-overlap", "tp-autograd-act", "bfloat16")
    assert pooled.rounds == 5
    assert pooled.median == pytest.approx(statistics.median([0.98, 0.98, 0.98, 1.04, 1.04]))
    assert pooled.ci95[0] <= pooled.median <= pooled.ci95[1]
    assert pooled.ci95 == (pytest.approx(0.98), pytest.approx(1.04))
    assert pooled.median_of_run_medians == pytest.approx(1.01)
    assert pooled.runs_at_or_below_1 == 1
    # The same figures from the command line, and as JSON.
    assert bench_pool.main([str(a), str(b), "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "pooled: 5 rounds of 2 runs, median 0.9800" in out and "1 of 2 runs at or below 1" in out
    assert json.loads((tmp_path / "p.json").read_text())["rounds"] == 5


def test_bad_files_are_one_line_naming_the_file(tmp_path, capsys):
    good = _run(tmp_path / "good.json", [1.0], [1.0])
    fp32 = _run(tmp_path / "fp32.json", [1.0], [1.0], dtype="float32")
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    for bad, expected in (
        (junk, "expected the JSON that scripts/bench.py writes"),
        (fp32, "expected timed rows of tp-overlap, tp-autograd-act in bfloat16, found none"),
        (tmp_path / "absent.json", "expected the JSON"),
    ):
        assert bench_pool.main([str(good), str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bench_pool.py: error: {bad}: ") and expected in err and "\n" not in err
    assert bench_pool.main([str(good), "--reference", "fairscale"]) == 2  # present, but untimed
    assert "expected timed rows of fairscale" in capsys.readouterr().err
