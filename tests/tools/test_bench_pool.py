"""benchmarks/bench_pool.py: paired ratios of several bench.py runs, pooled (figures from made-up runs)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_pool", ROOT / "benchmarks" / "bench_pool.py")
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


@pytest.mark.slow
def test_pools_the_rounds_of_every_run(tmp_path, capsys):
    # Run a: rounds with ratios 0.90, 1.00, 1.10 whose step times make the ratio of the medians
    # 1.05, not the median ratio 1.00 (so the per-round pairing is what is tested). Run b: 1.04 twice.
    a = _run(tmp_path / "a.json", [90.0, 300.0, 220.0], [100.0, 300.0, 200.0])
    b = _run(tmp_path / "b.json", [104.0, 208.0], [100.0, 200.0])
    runs = [bench_pool.read_ratios(p, "tp-overlap", "tp-autograd-act", "bfloat16") for p in (a, b)]
    assert statistics.median([90.0, 300.0, 220.0]) / statistics.median([100.0, 300.0, 200.0]) == pytest.approx(1.1)
    assert [r.median for r in runs] == pytest.approx([1.00, 1.04])
    assert runs[0].ratios == pytest.approx((0.9, 1.0, 1.1))
    pooled = bench_pool.pool(runs, "tp-overlap", "tp-autograd-act", "bfloat16")
    assert pooled.rounds == 5
    assert pooled.median == pytest.approx(1.04)  # of 0.9, 1.0, 1.1, 1.04, 1.04
    assert pooled.median_of_run_medians == pytest.approx(1.02)
    assert pooled.runs_at_or_below_1 == 1
    assert pooled.ci95[0] <= pooled.median <= pooled.ci95[1]
    # Command line and JSON give the same figures.
    assert bench_pool.main([str(a), str(b), "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "pooled: 5 rounds of 2 runs, median 1.0400" in out and "1 of 2 runs at or below 1" in out
    assert json.loads((tmp_path / "p.json").read_text())["rounds"] == 5


def _ratios(path: Path, ratios: list[float]) -> Path:
    return _run(path, [100.0 * r for r in ratios], [100.0] * len(ratios))


@pytest.mark.slow
def test_the_interval_counts_the_spread_between_runs(tmp_path):
    """Runs that agree within themselves but not with each other: resampling rounds alone would
    give a narrow interval around the pooled median; resampling the runs first must show the spread.
    One run alone (no spread between runs): the interval is that of its rounds."""
    fast = [_ratios(tmp_path / f"fast{i}.json", [0.97, 0.971, 0.972] * 10) for i in range(2)]
    slow = [_ratios(tmp_path / f"slow{i}.json", [1.03, 1.031, 1.032] * 10) for i in range(3)]
    runs = [bench_pool.read_ratios(p, "tp-overlap", "tp-autograd-act", "bfloat16") for p in fast + slow]
    pooled = bench_pool.pool(runs, "tp-overlap", "tp-autograd-act", "bfloat16")
    # 90 of the 150 rounds are slow: every resample of rounds alone has a median near 1.031.
    assert pooled.median == pytest.approx(1.03)
    assert pooled.ci95[0] < 0.975 and pooled.ci95[1] >= 1.03, pooled.ci95
    one = bench_pool.pool(runs[:1], "tp-overlap", "tp-autograd-act", "bfloat16")  # a fast run
    assert one.median == pytest.approx(0.971)
    assert 0.97 <= one.ci95[0] <= one.median <= one.ci95[1] <= 0.972


@pytest.mark.slow
def test_bad_files_are_one_line_naming_the_file(tmp_path, capsys):
    good = _run(tmp_path / "good.json", [1.0], [1.0])
    fp32 = _run(tmp_path / "fp32.json", [1.0], [1.0], dtype="float32")
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"rows": [{"name": 3, "dtype": "bfloat16", "times_ms": [1.0]}]}))
    cases = [
        (junk, "expected the JSON that benchmarks/bench.py writes"),
        (deep, "expected the JSON that benchmarks/bench.py writes"),
        (names, "expected timed rows of tp-overlap, tp-autograd-act in bfloat16, found none"),
        (fp32, "expected timed rows of tp-overlap, tp-autograd-act in bfloat16, found none"),
        (tmp_path / "absent.json", "expected the JSON"),
        (_run(tmp_path / "rounds.json", [1.0, 2.0], [1.0]), "expected the same number of rounds for both, got 2 and 1"),
    ]
    for i, bad_times in enumerate((["1"], [0.0], [float("nan")], [], [True], [-1.0])):
        cases.append((_run(tmp_path / f"times{i}.json", [1.0] * max(len(bad_times), 1), bad_times),
                      "expected tp-autograd-act's times_ms to be finite step times > 0"))  # fmt: skip
    for bad, expected in cases:
        assert bench_pool.main([str(good), str(bad)]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bench_pool.py: error: {bad}: ") and expected in err and "\n" not in err, err
    assert bench_pool.main([str(good), "--reference", "fairscale"]) == 2  # present, but untimed
    assert "expected timed rows of fairscale" in capsys.readouterr().err
    # An --out that cannot be written: one line, status 2 (the figures were printed already).
    assert bench_pool.main([str(good), "--out", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert capsys.readouterr().err.startswith("bench_pool.py: error: --out ")
