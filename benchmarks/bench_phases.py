"""Where the default block's step goes beyond its own compute: forward, backward and the waits, per rank.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_phases.py --dtype bfloat16

Two modules per rank, stepped in turn (the order alternating every round): the default
``ParallelFeedForward`` on the whole group, and ``alone``, the same class holding this rank's shard
on a group of its own, so the same code runs with no communication at all. Each step is timed in
parts: the forward, of which the wait for the forward all-reduce (``RowParallelLinear.reduce_partial``),
and the backward, of which the wait for the input-gradient all-reduce after the weight-gradient GEMMs
(``overlap_comm``: what the GEMMs did not hide). ``default - alone`` is what communication costs the
step: the waits, plus the GEMMs slowed by the transport's copies where no core is idle.

Medians and p10-p90 over ``--reps`` rounds per rank; a table is printed and JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tp_ffn import FeedForward, ParallelFeedForward, fused
from tp_ffn.shutdown import exit_without_teardown

PRESETS = {"cpu": (1024, 2816, 2048), "tiny": (256, 704, 512)}
PARTS = ("step", "forward", "forward all-reduce wait", "backward", "backward all-reduce wait")


class _Waits:
    """Adds up the time spent in the block's two waits during one step."""

    def __init__(self, block: ParallelFeedForward) -> None:
        self.forward = self.backward = 0.0
        reduce_partial = block.w2.reduce_partial

        def timed_reduce(y: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            out = reduce_partial(y)
            self.forward += time.perf_counter() - t
            return out

        block.w2.reduce_partial = timed_reduce  # this instance only
        self._wait = fused._wait_input_grad

    def __enter__(self) -> _Waits:
        self.forward = self.backward = 0.0
        wait = self._wait

        def timed_wait(*args: object) -> torch.Tensor:
            t = time.perf_counter()
            out = wait(*args)
            self.backward += time.perf_counter() - t
            return out

        fused._wait_input_grad = timed_wait
        return self

    def __exit__(self, *exc: object) -> None:
        fused._wait_input_grad = self._wait


def step(block: ParallelFeedForward, x: torch.Tensor, gy: torch.Tensor, autocast: torch.dtype | None) -> tuple[float, float]:
    """One forward + backward; ``(forward s, backward s)``."""
    x.grad = None
    for p in block.parameters():
        p.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        y = block(x)
    t1 = time.perf_counter()
    y.backward(gy.to(y.dtype))
    return t1 - t0, time.perf_counter() - t1


def run(dim: int, hidden: int, tokens: int, dtype: str, reps: int) -> dict[str, dict[str, list[float]]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dense = FeedForward(dim, hidden)
    default = ParallelFeedForward.from_dense(dense)
    own = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    # This rank's shards (the default's own parameters) as the whole block of a one-rank group.
    alone = ParallelFeedForward.from_dense(default.state_dict(), group=own)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    x = torch.randn(1, tokens, dim, requires_grad=True)
    gy = torch.randn(1, tokens, dim)
    waits = _Waits(default)
    times: dict[str, dict[str, list[float]]] = {"default": {p: [] for p in PARTS}, "alone": {p: [] for p in PARTS}}
    for i in range(reps + 2):  # two untimed rounds first (the fused kernels compile on first use)
        order = (("default", default), ("alone", alone)) if i % 2 else (("alone", alone), ("default", default))
        for name, block in order:
            with waits:
                f, b = step(block, x, gy, autocast)
            if i >= 2:
                row = times[name]
                row["step"].append(f + b)
                row["forward"].append(f)
                row["backward"].append(b)
                row["forward all-reduce wait"].append(waits.forward if name == "default" else 0.0)
                row["backward all-reduce wait"].append(waits.backward if name == "default" else 0.0)
    return times


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{module: {part: (median, p10, p90) ms}}``."""
    out = {}
    for name, parts in times.items():
        out[name] = {}
        for part, values in parts.items():
            ms = sorted(v * 1e3 for v in values)
            q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
            out[name][part] = (statistics.median(ms), q[0], q[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="dim, hidden dim, tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out", default="runs/bench", help="directory for bench_phases.json (runs/ is not tracked)")
    a = p.parse_args(argv)
    if a.reps < 1:
        print(f"bench_phases.py: --reps: expected >= 1, got {a.reps}", file=sys.stderr)
        return 2
    dist.init_process_group("gloo")
    try:
        dim, hidden, tokens = PRESETS[a.preset]
        summary = summarize(run(dim, hidden, tokens, a.dtype, a.reps))
        every: list[dict] = [{}] * dist.get_world_size()
        dist.all_gather_object(every, summary)
        if dist.get_rank() == 0:
            print(f"dim {dim}, hidden {hidden}, {tokens} tokens, {a.dtype}, world size {len(every)}, "
                  f"{torch.get_num_threads()} thread(s) per rank; median (p10-p90) ms of {a.reps} rounds")  # fmt: skip
            fmt: Callable[[tuple[float, float, float]], str] = lambda m: f"{m[0]:7.1f} ({m[1]:.1f}-{m[2]:.1f})"  # noqa: E731
            for r, ranks in enumerate(every):
                for part in PARTS:
                    d, s = ranks["default"][part], ranks["alone"][part]
                    print(f"  rank {r} {part:<26} default {fmt(d):<24} alone {fmt(s):<24} difference {d[0] - s[0]:6.1f}")
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            data = {"preset": a.preset, "dtype": a.dtype, "reps": a.reps, "threads_per_rank": torch.get_num_threads(),
                    "ms_median_p10_p90_by_rank": every}  # fmt: skip
            (out / "bench_phases.json").write_text(json.dumps(data, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
