"""What this machine's matrix units deliver: a GEMM-rate probe (the peak for MFU) and whether
bf16 is fast here.

:func:`gemm_rate` times square GEMMs on every rank of a process group at once, each with its own
threads (``torch.get_num_threads()``): on a CPU whose cores several ranks share, the rate one rank
gets is its share of what the whole machine does while every rank computes, which is the peak that
rank can reach during training. On a GPU each rank probes its own device.

Some CPUs have no fast bf16 path (no AVX-512 BF16 and no AMX): a bf16 GEMM there runs tens of times
slower than fp32 (measured on an AMD EPYC without AVX-512: 1.8 against 79.5 GFLOP/s on one core).
:func:`bf16_is_slow` is the decision, :func:`slow_bf16_message` the one line that says so.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["BF16_SLOW_RATIO", "bf16_is_slow", "gemm_rate", "slow_bf16_message"]

# bf16 slower than this fraction of the fp32 GEMM rate counts as "no fast bf16 path here". A CPU
# with one (AVX-512 BF16, AMX) runs bf16 GEMMs at 1x-16x fp32; one without, at about 1/40.
BF16_SLOW_RATIO = 0.25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _max_over_ranks(value: float, device: torch.device) -> float:
    if _world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gemm_rate(
    dtype: torch.dtype,
    device: torch.device,
    *,
    target_s: float = 0.02,
    max_n: int | None = None,
    reps: int = 3,
) -> float:
    """The GEMM rate one rank reaches in ``dtype`` on ``device``, in FLOP/s: the mean over the ranks
    of the default process group (if any) of each rank's best of ``reps`` timed ``n x n x n`` GEMMs,
    every rank computing at the same time. The same number on every rank.

    ``n`` starts at 256 and doubles (on every rank alike) until one GEMM takes ``target_s`` on the
    slowest rank or ``n`` reaches ``max_n`` (2048 on CPU, 8192 on CUDA): cheap where bf16 is slow,
    large enough to approach the peak where it is fast.
    """
    if max_n is None:
        max_n = 8192 if device.type == "cuda" else 2048
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        F.linear(a, b)  # warm-up: the first call of a size may pick or pack kernels
        elapsed = _max_over_ranks(_timed(a, b, device), device)
        if elapsed >= target_s or n >= max_n:
            break
        n *= 2
    best = min(_timed(a, b, device) for _ in range(reps))
    rate = 2.0 * n**3 / best
    world = _world()
    if world == 1:
        return rate
    t = torch.tensor([rate], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def _timed(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    if _world() > 1:
        dist.barrier()  # every rank computes at once: they share the CPU's cores
    t = time.perf_counter()
    F.linear(a, b)
    _sync(device)
    return time.perf_counter() - t


def bf16_is_slow(bf16_rate: float, fp32_rate: float, ratio: float = BF16_SLOW_RATIO) -> bool:
    """True when bf16 GEMMs run below ``ratio`` x the fp32 rate: no fast bf16 path on this device."""
    return bf16_rate < ratio * fp32_rate


def slow_bf16_message(bf16_rate: float, fp32_rate: float) -> str:
    """One line naming both rates (FLOP/s) and what follows from them."""
    return (
        f"bfloat16 GEMMs run at {bf16_rate / 1e9:.1f} GFLOP/s on this CPU against {fp32_rate / 1e9:.1f} GFLOP/s "
        f"in float32 ({bf16_rate / fp32_rate:.2f}x; no fast bf16 path, e.g. AVX-512 BF16 or AMX): bf16 compute "
        f"will be about {fp32_rate / bf16_rate:.0f}x slower than float32"
    )
