"""What a checkpoint costs the training loop: the stall per save, synchronous vs ``--ckpt-async``, paired.

    OMP_NUM_THREADS=1 python benchmarks/bench_ckpt.py --preset gpt2-small --rounds 5
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_ckpt.py --preset small --tp 2

Builds the training job's model, AdamW state and schedule at ``--preset`` (TP x FSDP2 as
``scripts/train.py`` does; the world size / ``--tp`` is dp), and in each round saves the whole
training state twice with the job's own :class:`~tp_ffn.train.checkpoint.saving.Saver` into ``--dir``, once
synchronously and once in the background (``dcp.async_save``), the order alternating between rounds
so that neither always runs on a warmer page cache. ``--steps-between`` training steps follow each
save (the background write overlaps them).

The stall of a save is what the loop waits for: the synchronous save whole; for the async one the
call (staging: a copy of each rank's state into CPU memory, and DCP's planning) plus its completion
once written (gathering the digests, meta.json, the rename). The background write itself is reported
too, and the training steps that ran during it next to those that did not (on a CPU-only machine the
write competes with training for the cores). Also measured: the per-step stop check of the training
loop (one all-reduce of 4 bytes, :func:`tp_ffn.train.consensus.any_rank`) next to a training step.

Each round's async/sync stall ratio is paired; the summary gives medians and the ratio's median.
JSON goes to ``--out``; the scratch checkpoints are removed at the end. Timings on a shared or busy
machine are noise: take them on a quiet one, and name it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_ffn.models.llama import PRESETS, Transformer
from tp_ffn.shutdown import exit_without_teardown
from tp_ffn.train.checkpoint.saving import Saver
from tp_ffn.train.checkpoint.store import TrainingState
from tp_ffn.train.consensus import any_rank
from tp_ffn.train.run.optim import WarmupCosine, build_optimizer, build_scheduler, init_adamw_state
from tp_ffn.train.run.parallelize import build_mesh, init_runtime, parallelize


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the rest of the world is dp)")
    p.add_argument("--rounds", type=int, default=3, help="pairs of saves (one synchronous, one async)")
    p.add_argument("--steps-between", type=int, default=4, help="training steps after each save")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--check-calls", type=int, default=200, help="stop checks timed (each one all-reduce)")
    p.add_argument("--dir", type=Path, default=Path("runs/bench_ckpt/ckpt"), help="scratch --ckpt-dir (emptied)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_ckpt/ckpt.json"))
    args = p.parse_args(argv)
    for name in ("tp", "rounds", "steps_between", "seq_len", "batch", "check_calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rt = init_runtime("auto")
        if self.rt.world % args.tp:
            raise SystemExit(f"bench_ckpt.py: error: --tp {args.tp} does not divide the world size {self.rt.world}")
        self.mesh = build_mesh(self.rt.device, self.rt.world // args.tp, args.tp)
        self.cfg = PRESETS[args.preset]
        torch.manual_seed(0)
        model = Transformer(self.cfg, group=self.mesh["tp"], device=self.rt.device)
        self.model = parallelize(model, self.mesh)
        self.opt = build_optimizer(self.model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
        init_adamw_state(self.opt)
        self.sched = build_scheduler(self.opt, WarmupCosine(10, 1000, 0.1))
        self.state = TrainingState(self.model, self.opt, self.sched)
        self.step = 0

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> float:
        """One optimizer step on random tokens; its wall time (every rank waits for the slowest)."""
        a = self.args
        g = torch.Generator().manual_seed(self.step * 1000 + self.mesh["dp"].get_local_rank())
        tokens = torch.randint(0, self.cfg.vocab_size, (a.batch, a.seq_len + 1), generator=g).to(self.rt.device)
        t0 = time.perf_counter()
        logits = self.model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.sync()
        dist.barrier()
        self.step += 1
        return time.perf_counter() - t0

    def timed_save(self, saver: Saver, background: bool) -> dict[str, Any]:
        dist.barrier()
        t0 = time.perf_counter()
        sd, planner = self.state.snapshot(self.step, 0)
        saver.save(sd, planner, self.step, {"bench": True}, background=background)
        call = time.perf_counter() - t0
        steps, write_s, finish_s = [], None, 0.0
        for _ in range(self.args.steps_between):
            writing = background and saver.pending_here()  # this rank's part still being written
            steps.append((self.train_step(), writing))
            if background and write_s is None and not any_rank([saver.pending_here()], self.rt.device)[0]:
                write_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                saver.poll(True)
                finish_s = time.perf_counter() - t1
        if background and saver.pending is not None:  # still writing after the steps: wait (counted)
            t1 = time.perf_counter()
            saver.wait()
            finish_s = time.perf_counter() - t1
            write_s = time.perf_counter() - t0
        stall = call + finish_s
        return {
            "mode": "async" if background else "sync", "step": self.step, "stall_s": stall, "call_s": call,
            "finish_s": finish_s, "write_s": write_s if background else call, "step_s": steps,
        }  # fmt: skip

    def stop_check_cost(self) -> dict[str, float]:
        times = []
        for _ in range(self.args.check_calls):
            t0 = time.perf_counter()
            any_rank([False, False, False, False], self.rt.device)
            times.append(time.perf_counter() - t0)
        steps = [self.train_step() for _ in range(3)]  # nothing being written now
        return {"check_us": statistics.median(times) * 1e6, "step_s": statistics.median(steps)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    b = _Bench(args)
    main_rank = b.rt.rank == 0
    if main_rank:
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    saver = Saver(args.dir, keep_last=1, background=True)
    for _ in range(2):  # warm up (allocator, first collectives)
        b.train_step()
    rounds = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        pair = {("async" if bg else "sync"): b.timed_save(saver, bg) for bg in order}
        pair["ratio"] = pair["async"]["stall_s"] / pair["sync"]["stall_s"]
        rounds.append(pair)
        if main_rank:
            print(
                f"round {r + 1}: stall sync {pair['sync']['stall_s']:.3f} s, async {pair['async']['stall_s']:.3f} s "
                f"(staging {pair['async']['call_s']:.3f} + completion {pair['async']['finish_s']:.3f}; written in "
                f"{pair['async']['write_s']:.3f} s), ratio {pair['ratio']:.3f}",
                flush=True,
            )
    check = b.stop_check_cost()
    saver.wait()
    size = sum(p.stat().st_size for p in args.dir.rglob("*") if p.is_file()) if main_rank else 0
    overlapped = [t for p in rounds for t, writing in p["async"]["step_s"] if writing]
    alone = [t for p in rounds for mode in ("sync", "async") for t, writing in p[mode]["step_s"] if not writing]
    summary = {
        "median_stall_sync_s": statistics.median(p["sync"]["stall_s"] for p in rounds),
        "median_stall_async_s": statistics.median(p["async"]["stall_s"] for p in rounds),
        "median_ratio": statistics.median(p["ratio"] for p in rounds),
        "median_async_write_s": statistics.median(p["async"]["write_s"] for p in rounds),
        "median_step_during_async_write_s": statistics.median(overlapped) if overlapped else None,
        "median_step_s": statistics.median(alone) if alone else None,
        "stop_check_us": check["check_us"],
        "stop_check_share_of_step": check["check_us"] * 1e-6 / check["step_s"],
    }
    result = {
        "preset": args.preset, "params": b.cfg.num_params(), "world": b.rt.world, "tp": args.tp,
        "device": str(b.rt.device), "checkpoint_bytes": size, "rounds": rounds, "summary": summary,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "python": sys.version.split()[0]},
    }  # fmt: skip
    dist.barrier()
    if main_rank:
        shutil.rmtree(args.dir, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        s = summary
        print(
            f"{args.preset} ({b.cfg.num_params() / 1e6:.1f} M params, checkpoint {size / 1e9:.2f} GB, world {b.rt.world}, "
            f"tp {args.tp}, {b.rt.device}): stall per checkpoint sync {s['median_stall_sync_s']:.3f} s, async "
            f"{s['median_stall_async_s']:.3f} s (median ratio {s['median_ratio']:.3f} over {args.rounds} rounds); "
            f"stop check {s['stop_check_us']:.0f} us a step ({100 * s['stop_check_share_of_step']:.2f}% of a step)\n"
            f"JSON: {args.out}",
            flush=True,
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
