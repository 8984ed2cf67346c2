"""Peak memory of building a ParallelFeedForward, per rank, against its shard and the full block.

    torchrun --nproc_per_node 2 benchmarks/init_memory.py --dim 8192 --hidden-dim 28672

Each rank reports how much its peak resident memory (CPU) or peak allocated memory (CUDA) grew
while the module was built, next to the bytes of its own shard and of the full dense block. The
weights are drawn so that they are the same whatever the world size; no rank ever holds a full
weight matrix to get there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from tp_ffn import ParallelFeedForward
from tp_ffn.shutdown import exit_without_teardown

GiB = 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
        f.write("5")


def peak_bytes(device: torch.device) -> int:
    """Peak allocated (CUDA) or peak resident (CPU, VmHWM) bytes since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--hidden-dim", type=int, default=28672)
    p.add_argument("--bias", action="store_true")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    ParallelFeedForward(8, 16, device=device)  # map the code paths before the baseline
    reset_peak(device)
    before = peak_bytes(device)
    t0 = time.perf_counter()
    ffn = ParallelFeedForward(a.dim, a.hidden_dim, bias=a.bias, device=device)
    seconds = time.perf_counter() - t0
    grown = peak_bytes(device) - before
    shard = sum(t.numel() * t.element_size() for t in ffn.parameters())
    full = (3 * a.dim * a.hidden_dim + (2 * a.hidden_dim + a.dim) * a.bias) * 4
    rng = torch.get_rng_state()
    rows = [None] * world
    dist.all_gather_object(rows, (rank, grown, shard, seconds, rng))
    if rank == 0:
        print(
            f"ParallelFeedForward({a.dim}, {a.hidden_dim}) over {world} ranks on {device.type}; full block {full / GiB:.2f} GiB fp32"
        )
        print(f"{'rank':>4} {'shard GiB':>10} {'peak grew GiB':>14} {'grew/shard':>11} {'seconds':>8}")
        for r, g, s, sec, _ in rows:
            print(f"{r:>4} {s / GiB:>10.3f} {g / GiB:>14.3f} {g / s:>11.3f} {sec:>8.1f}")
        same = all(torch.equal(rows[0][4], r[4]) for r in rows)
        print(f"RNG state after the build identical on every rank: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
