"""Paired speed ratios pooled over independent runs of ``benchmarks/bench.py``.

    python benchmarks/bench_pool.py runs/a/bench.json runs/b/bench.json ... \\
        --candidate tp-overlap --reference tp-autograd-act [--dtype bfloat16] [--out pooled.json]

One run of ``bench.py`` gives one paired ratio: the median over its rounds of candidate / reference
step time within a round. On a shared machine that median moves from run to run by more than the
differences it is asked to resolve (on the 2-core VM of ``docs/benchmarks.md``, run medians spread
over 3.6% in bf16 and 4.3% in fp32), because each process draws its own allocator layout, page faults
and neighbours. This pools the rounds of several runs (separate processes, so separate draws): per
run its paired median and mean, then the median over all rounds with a 95% bootstrap interval
(runs resampled, then the rounds of each drawn run; seeded), the median of the run medians, and
how many runs came out at or below 1. Reads only JSON (``json.loads``: no input runs code); every
file must hold both candidates' step times in the dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunRatios:
    path: str
    rounds: int
    median: float
    mean: float
    ratios: tuple[float, ...]


@dataclass(frozen=True)
class Pooled:
    candidate: str
    reference: str
    dtype: str
    runs: tuple[RunRatios, ...]
    rounds: int
    median: float
    ci95: tuple[float, float]
    median_of_run_medians: float
    runs_at_or_below_1: int


def _times(row: dict[str, Any], path: Path, name: str) -> list[float]:
    times = row["times_ms"]
    if not times or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in times
    ):
        raise ValueError(f"{path}: expected {name}'s times_ms to be finite step times > 0, got {str(times)[:80]}")
    return [float(t) for t in times]


def read_ratios(path: Path, candidate: str, reference: str, dtype: str) -> RunRatios:
    """The per-round ratios ``candidate / reference`` of one ``bench.json``; ``ValueError`` naming the
    file when it is not one, lacks either candidate in ``dtype`` or holds other than step times."""
    try:
        summary = json.loads(path.read_text())
        rows = {
            r["name"]: r
            for r in summary["rows"]
            if isinstance(r["name"], str) and r.get("dtype") == dtype and isinstance(r.get("times_ms"), list)
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: expected the JSON that benchmarks/bench.py writes ({type(e).__name__}: {e})") from None
    missing = [name for name in (candidate, reference) if name not in rows]
    if missing:
        raise ValueError(f"{path}: expected timed rows of {', '.join(missing)} in {dtype}, found {sorted(rows) or 'none'}")
    a, b = _times(rows[candidate], path, candidate), _times(rows[reference], path, reference)
    if len(a) != len(b):
        raise ValueError(f"{path}: expected the same number of rounds for both, got {len(a)} and {len(b)}")
    ratios = tuple(x / y for x, y in zip(a, b))
    return RunRatios(str(path), len(ratios), statistics.median(ratios), statistics.fmean(ratios), ratios)


def pool(runs: list[RunRatios], candidate: str, reference: str, dtype: str, *, resamples: int = 4000, seed: int = 0) -> Pooled:
    """The rounds of every run together: their median, its 95% bootstrap interval, and the run-level view.

    The interval resamples in two stages, runs and then the rounds of each drawn run, because the
    runs differ from each other more than their rounds do (each process draws its own allocator
    layout and neighbours): resampling rounds alone would treat them as independent and come out
    too narrow."""
    every = [r for run in runs for r in run.ratios]
    rng = random.Random(seed)
    medians = []
    for _ in range(resamples):
        drawn = [r for run in rng.choices(runs, k=len(runs)) for r in rng.choices(run.ratios, k=run.rounds)]
        medians.append(statistics.median(drawn))
    medians.sort()
    lo, hi = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return Pooled(
        candidate, reference, dtype, tuple(runs), len(every), statistics.median(every), (lo, hi),
        statistics.median(run.median for run in runs), sum(run.median <= 1.0 for run in runs),
    )  # fmt: skip


def report(p: Pooled) -> str:
    lines = [f"{p.candidate} / {p.reference}, {p.dtype}, paired per round (below 1: {p.candidate} faster)"]
    for run in p.runs:
        lines.append(f"  {run.path}: {run.rounds} rounds, median {run.median:.4f}, mean {run.mean:.4f}")
    lines.append(
        f"pooled: {p.rounds} rounds of {len(p.runs)} runs, median {p.median:.4f} "
        f"(95% bootstrap interval {p.ci95[0]:.4f}-{p.ci95[1]:.4f}); median of the run medians "
        f"{p.median_of_run_medians:.4f}; {p.runs_at_or_below_1} of {len(p.runs)} runs at or below 1"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_pool.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="bench.json files of independent runs")
    ap.add_argument("--candidate", default="tp-overlap")
    ap.add_argument("--reference", default="tp-autograd-act")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--out", type=Path, help="also write the pooled figures (and every ratio) as JSON here")
    a = ap.parse_args(argv)
    try:
        runs = [read_ratios(f, a.candidate, a.reference, a.dtype) for f in a.files]
    except ValueError as e:
        print(f"bench_pool.py: error: {e}", file=sys.stderr)
        return 2
    pooled = pool(runs, a.candidate, a.reference, a.dtype)
    print(report(pooled))
    if a.out is not None:
        try:
            a.out.write_text(json.dumps(asdict(pooled), indent=1) + "\n")
        except OSError as e:
            print(f"bench_pool.py: error: --out {a.out}: cannot write it ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
