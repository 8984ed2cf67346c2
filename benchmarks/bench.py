"""Forward+backward step time of the feed-forward block: tp_ffn's modes against the peers.

    # the CPU target shape: 2 gloo ranks, 1 thread each, fp32 and bf16 autocast
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench.py --preset cpu --dtype both
    # a GPU node (NCCL), Llama-2-7B / Llama-3-8B FFN shapes, bf16
    torchrun --standalone --nproc_per_node 8 benchmarks/bench.py --preset llama2-7b --dtype bfloat16
    # one GPU, compiled (inductor), Llama-3-8B FFN shape, TP=1
    python benchmarks/bench.py --preset llama3-8b --dtype bfloat16 --compile --candidates dense,tp-overlap
    # one rank's compute at TP=4 without communication: PyTorch's single-process fake process group
    python benchmarks/bench.py --preset llama3-8b --dtype bfloat16 --fake-world 4 --candidates local,tp-overlap
    # the same at TP=1, 2, 4 and 8 in one process (into runs/bench/fake-1, fake-2, ...)
    python benchmarks/bench.py --preset llama3-8b --dtype bfloat16 --fake-world 1,2,4,8 --candidates local,tp-overlap

Candidates, each timed on the same weights and inputs (``--candidates`` picks a subset):

==================  ==========================================================================
dense               tp_ffn.FeedForward in one process (rank 0) with the threads of all ranks
tp-plain            ParallelFeedForward, reference path: no fusion, no overlap
tp-fused            w1/w3 as one GEMM
tp-overlap          input-gradient all-reduce during the weight-gradient GEMMs: the default mode
tp-fused-overlap    both
tp-chunked          overlap + forward all-reduce in 4 token chunks overlapping the w2 GEMM
tp-sp               sequence parallel (all-gather / reduce-scatter), overlap
tp-autograd-act     tp-overlap as it ran before the two-tensor SwiGLU (tp_ffn/swiglu.py): act(g) * u
                    and the down projection left to autograd, which keeps act(g) and the product too
tp-eager-swiglu     tp-overlap with the SwiGLU's elementwise work as ATen's eager kernels one by one
                    (TP_FFN_FUSED_SWIGLU=0), as it ran before the fused kernels (tp_ffn/swiglu_kernels.py)
fairscale           Meta's FeedForward on fairscale's Column/RowParallelLinear
torch-tp            parallelize_module(ColwiseParallel on w1/w3, RowwiseParallel on w2), DTensor
local               the communication-free compute of this rank's (unfused) shard: the floor
==================  ==========================================================================

After warm-up the candidates run interleaved and rotated (A B C, B C A, ...) for ``--reps`` rounds, each
step between barriers; a step's time is the slowest rank's. Reported per candidate: median step
time and its p10-p90 spread, the paired ratio to each reference (median over rounds of the
ratio within a round), tokens/s, achieved GFLOP/s and its fraction of the GEMM rate measured
in the same run, MFU (model FLOPs utilisation: the block's FLOPs per second over the peak of the
devices that computed them, the peak given by ``--peak-tflops`` per device or else the GEMM rate
probed in the same run), collectives per step and their bytes, and memory per rank: the peak
allocated during a step above what was live before it (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the profiler's allocation records) and the activations saved for backward (``saved MiB``:
buffers autograd keeps between forward and backward, parameters excluded; exact on any device). The
JSON also has each candidate's minor page faults per step (median over rounds of the most on any
rank: pages the OS had to map afresh, what memory returned by the CPU allocator costs on reuse). A
table is printed and JSON plus a PNG chart are written (``--out``).

``--compile`` runs every candidate under ``torch.compile`` (inductor), compiled before the timed
rounds. ``--fake-world N`` runs one process as rank 0 of N on PyTorch's fake process group
(collectives return at once, nothing is communicated): each candidate's time is one rank's
compute at TP=N, and GFLOP/s, the GEMM-rate probe and MFU are per rank.

bf16 on a CPU without a fast bf16 path (no AVX-512 BF16 or AMX: tens of times slower than fp32) is
skipped with a note unless ``--force-bf16``: the GEMM rates of both dtypes are probed once at start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_ffn import FeedForward, ParallelFeedForward, split_sequence
from tp_ffn import machine as tp_machine
from tp_ffn.diagnostics import profile_step
from tp_ffn.fused import gate_up_projection
from tp_ffn.shutdown import exit_without_teardown
from tp_ffn import swiglu_kernels

PRESETS = {
    "cpu": (1024, 2816, 2048),
    "tiny": (256, 704, 512),
    "llama2-7b": (4096, 11008, 8192),
    "llama3-8b": (4096, 14336, 8192),
}
ALL = [
    "dense",
    "tp-plain",
    "tp-fused",
    "tp-overlap",
    "tp-fused-overlap",
    "tp-chunked",
    "tp-sp",
    "tp-autograd-act",
    "tp-eager-swiglu",
    "fairscale",
    "torch-tp",
    "local",
]
TP_MODES = {
    "tp-plain": {"fuse_gate_up": False, "overlap_comm": False},
    "tp-fused": {"fuse_gate_up": True, "overlap_comm": False},
    "tp-overlap": {"fuse_gate_up": False, "overlap_comm": True},
    "tp-fused-overlap": {"fuse_gate_up": True, "overlap_comm": True},
    "tp-chunked": {"fuse_gate_up": False, "overlap_comm": True, "comm_chunks": 4},
    "tp-sp": {"fuse_gate_up": False, "overlap_comm": True, "sequence_parallel": True},
    "tp-autograd-act": {"fuse_gate_up": False, "overlap_comm": True},
    "tp-eager-swiglu": {"fuse_gate_up": False, "overlap_comm": True},
}
# The references each candidate's paired ratio is taken against.
REFERENCES = ("local", "fairscale", "torch-tp", "dense", "tp-autograd-act")


@dataclass(frozen=True)
class BenchConfig:
    dim: int
    hidden_dim: int
    tokens: int
    dtypes: tuple[str, ...]
    candidates: tuple[str, ...]
    reps: int
    warmup: int
    out: str
    compile: bool = False
    fake_world: int | None = None
    peak_tflops: float | None = None
    force_bf16: bool = False
    # --fake-world N,M,...: every size in turn in this one process (fake_world is the current one).
    fake_worlds: tuple[int, ...] = ()
    profile: str | None = None  # --profile DIR

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "tokens", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        for world in (self.fake_world, *self.fake_worlds):
            if world is not None and world < 1:
                raise ValueError(f"--fake-world: expected sizes >= 1, got {world}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops: expected a rate > 0 (TFLOP/s per device), got {self.peak_tflops}")
        unknown = sorted(set(self.candidates) - set(ALL))
        if unknown:
            raise ValueError(f"--candidates: unknown {unknown}; choose from {ALL}")


@dataclass
class Result:
    name: str
    dtype: str
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)
    collectives: dict[str, int] = field(default_factory=dict)
    comm_bytes: int = 0
    peak_bytes: int = 0
    saved_bytes: int = 0
    flops_per_step: float = 0.0
    comm_by_dtype: dict[str, float] = field(default_factory=dict)
    note: str = ""


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="dim, hidden dim and tokens (cpu: 1024, 2816, 2048)"
    )
    p.add_argument("--dim", type=int)
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--tokens", type=int, help="tokens per step (one sequence)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "both"],
        default="float32",
        help="bfloat16 = autocast over fp32 weights",
    )
    p.add_argument("--candidates", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--out", default="runs/bench", help="directory for bench.json, bench.md and bench.png (runs/ is not tracked)"
    )
    p.add_argument("--compile", action="store_true", help="run every candidate under torch.compile (inductor)")
    p.add_argument(
        "--fake-world",
        metavar="N[,N...]",
        help="one process as rank 0 of N on the fake process group: one rank's compute at TP=N, no "
        "communication; several sizes run one after the other in this process, each into --out/fake-N",
    )
    p.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s of one device in the dtype, for MFU (default: the GEMM probe)"
    )
    p.add_argument("--force-bf16", action="store_true", help="run bf16 even where this CPU's bf16 GEMMs are slow")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed rounds, one step per candidate under torch.profiler: its operator table per rank into "
        "DIR (profile_<dtype>_<candidate>_rank<r>.txt)",
    )
    a = p.parse_args(argv)
    dim, hidden, tokens = PRESETS[a.preset]
    dtypes = ("float32", "bfloat16") if a.dtype == "both" else (a.dtype,)
    worlds: tuple[int, ...] = ()
    if a.fake_world is not None:
        try:
            worlds = tuple(int(w) for w in a.fake_world.split(","))
        except ValueError:
            raise ValueError(f"--fake-world: expected sizes like 4 or 1,2,4,8, got {a.fake_world!r}") from None
    return BenchConfig(
        a.dim or dim, a.hidden_dim or hidden, a.tokens or tokens, dtypes,
        tuple(c for c in a.candidates.split(",") if c), a.reps, a.warmup, a.out, a.compile,
        worlds[0] if worlds else None, a.peak_tflops, a.force_bf16, worlds if len(worlds) > 1 else (), a.profile,
    )  # fmt: skip


def build(
    name: str, dense: FeedForward, cfg: BenchConfig, device: torch.device, mesh
) -> tuple[torch.nn.Module | None, str]:  # noqa: ANN001
    """The module of candidate ``name`` on this rank (None where this rank sits the step out)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if name == "dense":
        return (dense if rank == 0 else None), ""
    if name == "tp-autograd-act":
        return AutogradActFFN.from_dense(dense, device=device, **TP_MODES[name]), ""
    if name in TP_MODES:
        return ParallelFeedForward.from_dense(dense, device=device, **TP_MODES[name]), ""
    if name == "local":
        from tp_ffn import shard_bounds

        s, e = shard_bounds(cfg.hidden_dim, world, rank)
        local = FeedForward(cfg.dim, e - s, device="meta")
        sd = dense.state_dict()
        local.load_state_dict(
            {
                "w1.weight": sd["w1.weight"][s:e],
                "w2.weight": sd["w2.weight"][:, s:e],
                "w3.weight": sd["w3.weight"][s:e],
            },
            assign=True,
        )
        return local.to(device), ""
    if name == "fairscale":
        if cfg.hidden_dim % world:
            return None, f"fairscale needs hidden % world == 0 ({cfg.hidden_dim} % {world})"
        if cfg.fake_world is not None:
            return None, "fairscale keeps a global group of its own, not the fake one"
        try:
            return FairscaleFFN(dense, world, rank).to(device), ""
        except ImportError:
            return None, "fairscale is not installed"
    if name == "torch-tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        clone = FeedForward(cfg.dim, cfg.hidden_dim, device="meta")
        clone.load_state_dict({k: v.clone() for k, v in dense.state_dict().items()}, assign=True)
        clone = clone.to(device)
        plan = {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}
        return parallelize_module(clone, mesh, plan), ""
    raise ValueError(name)


class AutogradActFFN(ParallelFeedForward):
    """ParallelFeedForward's forward before the two-tensor SwiGLU, for paired speed and memory
    ratios: the same GEMMs and collectives, with ``act(g) * u`` and the down projection left to
    autograd (which keeps ``act(g)`` and the product for backward as well as ``g`` and ``u``).
    Not sequence parallel, not chunked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = gate_up_projection(
            x, self.w1.weight, self.w3.weight, self.w1.bias, self.w3.bias, self.tp.group,
            fused=self.fuse_gate_up, overlap=self.overlap_comm,
        )  # fmt: skip
        return self.w2.forward_parallel(self.act(g) * u)


class FairscaleFFN(torch.nn.Module):
    """Meta's Llama FeedForward on fairscale's layers (each column-parallel layer copies the input)."""

    def __init__(self, dense: FeedForward, world: int, rank: int) -> None:
        super().__init__()
        from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        if not model_parallel_is_initialized():
            initialize_model_parallel(world)
        keep = lambda w: w  # noqa: E731 - weights are copied in below
        d, h = dense.dim, dense.hidden_dim
        self.w1 = ColumnParallelLinear(d, h, bias=False, gather_output=False, init_method=keep)
        self.w2 = RowParallelLinear(h, d, bias=False, input_is_parallel=True, init_method=keep)
        self.w3 = ColumnParallelLinear(d, h, bias=False, gather_output=False, init_method=keep)
        n = h // world
        with torch.no_grad():
            self.w1.weight.copy_(dense.w1.weight[rank * n : (rank + 1) * n])
            self.w3.weight.copy_(dense.w3.weight[rank * n : (rank + 1) * n])
            self.w2.weight.copy_(dense.w2.weight[:, rank * n : (rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def gemm_rate(cfg: BenchConfig, dtype: torch.dtype, device: torch.device) -> Callable[[], float]:
    """A probe of the machine's GEMM rate: every rank runs the block's shard-sized GEMM (F.linear's
    layout) at once; the probe returns the rates summed over ranks, in GFLOP/s. Called once per
    round, between the candidates, so that it sees the same machine they do."""
    world = dist.get_world_size()
    n = cfg.hidden_dim // world
    a = torch.randn(cfg.tokens, cfg.dim, device=device, dtype=dtype)
    b = torch.randn(n, cfg.dim, device=device, dtype=dtype)

    def probe() -> float:
        times = []
        for _ in range(3):
            sync(device)
            dist.barrier()
            t = time.perf_counter()
            F.linear(a, b)
            sync(device)
            times.append(time.perf_counter() - t)
        rate = torch.tensor(2 * cfg.tokens * cfg.dim * n / statistics.median(times) / 1e9)
        dist.all_reduce(rate)
        return rate.item()

    return probe


def skip_slow_bf16(cfg: BenchConfig, device: torch.device) -> tuple[BenchConfig, str | None]:
    """Drop bf16 from ``cfg.dtypes`` (with the note saying why) where this CPU's bf16 GEMMs run below
    a quarter of fp32's (:func:`tp_ffn.machine.bf16_is_slow`), unless ``--force-bf16``. One probe
    of each dtype, on every rank at once."""
    if device.type != "cpu" or "bfloat16" not in cfg.dtypes or cfg.force_bf16:
        return cfg, None
    bf16 = tp_machine.gemm_rate(torch.bfloat16, device)
    fp32 = tp_machine.gemm_rate(torch.float32, device)
    if not tp_machine.bf16_is_slow(bf16, fp32):
        return cfg, None
    note = f"bfloat16 skipped: {tp_machine.slow_bf16_message(bf16, fp32)}; --force-bf16 runs it anyway"
    return replace(cfg, dtypes=tuple(d for d in cfg.dtypes if d != "bfloat16")), note


def minor_faults() -> int | None:
    """This process's minor page faults so far (pages first touched: fresh memory from the OS);
    None where the OS does not count them for Python (not Unix)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    name: str, module: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, autocast: torch.dtype | None
) -> Callable[[], None]:
    group = dist.group.WORLD
    sp = name == "tp-sp"
    xl = (split_sequence(x, group) if sp else x).detach().requires_grad_()
    gyl = split_sequence(gy, group) if sp else gy
    if name == "torch-tp":
        xl = x.detach().requires_grad_()
    fused = swiglu_kernels.ENABLED and name != "tp-eager-swiglu"

    def step() -> None:
        enabled = swiglu_kernels.ENABLED
        swiglu_kernels.ENABLED = fused
        xl.grad = None
        for p in module.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            y = module(xl)
        y = y.full_tensor() if hasattr(y, "full_tensor") else y
        # DTensor hands back its output before the forward all-reduce has finished; a model reads
        # it at once, so the step waits for it too (otherwise torch-tp's collective goes untimed).
        if hasattr(y, "trigger_wait"):
            y.trigger_wait()
        y.backward(gyl.to(y.dtype))
        swiglu_kernels.ENABLED = enabled

    return step


def write_profiles(cfg: BenchConfig, dtype: str, steps: dict[str, Callable[[], None] | None], rank: int) -> None:
    """One step of each candidate under torch.profiler (every rank, between barriers): the operator
    table by self CPU time, with allocations, into ``cfg.profile/profile_<dtype>_<candidate>_rank<r>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(cfg.profile)
    out.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        dist.barrier()
        if step is None:
            continue
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            step()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
        (out / f"profile_{dtype}_{name}_rank{rank}.txt").write_text(table)


def run(cfg: BenchConfig) -> list[Result]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    threads = torch.get_num_threads()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,)) if "torch-tp" in cfg.candidates else None
    torch.manual_seed(0)
    dense = FeedForward(cfg.dim, cfg.hidden_dim).to(device)
    x = torch.randn(1, cfg.tokens, cfg.dim, device=device)
    gy = torch.randn(1, cfg.tokens, cfg.dim, device=device)
    # 3 GEMMs x (forward + 2 backward) x 2 flops, for the whole machine: every candidate does the
    # full block's work in total ("local" too: each rank computes its own shard). On the fake group
    # this process is the only real rank: it does 1 / world of that (dense: all of it).
    flops = 18.0 * cfg.tokens * cfg.dim * cfg.hidden_dim
    fake = cfg.fake_world is not None
    # Dense runs on rank 0 alone, with the threads of all ranks (not on the fake group: one process).
    dense_threads = threads if fake else threads * world

    results: list[Result] = []
    for dtype_name in cfg.dtypes:
        autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
        probe = gemm_rate(cfg, autocast or torch.float32, device)
        rates: list[float] = []
        steps: dict[str, Callable[[], None] | None] = {}
        params: dict[str, list[torch.Tensor]] = {}
        res: dict[str, Result] = {}
        for name in cfg.candidates:
            module, note = build(name, dense, cfg, device, mesh)
            per_step = flops / world if fake and name != "dense" else flops
            res[name] = Result(name, dtype_name, note=note, flops_per_step=per_step)
            if module is None and name != "dense":
                steps[name] = None
                continue
            params[name] = [] if module is None else list(module.parameters())
            if module is not None and cfg.compile:
                module = torch.compile(module)
            steps[name] = None if module is None else make_step(name, module, x, gy, autocast)
        # One step per candidate to warm up (compile, allocator, library handles), then one
        # profiled: collectives, bytes, peak memory, activations saved for backward.
        for name, step in steps.items():
            if step is None and res[name].note:
                continue
            if name == "dense":
                torch.set_num_threads(dense_threads)
            if step is not None:
                step()
            prof = profile_step(step, device, exclude=params[name]) if step is not None else None
            torch.set_num_threads(threads)
            dist.barrier()
            if prof is not None:
                r = res[name]
                r.collectives, r.comm_bytes, r.peak_bytes = dict(prof.collectives), prof.nbytes, prof.peak_bytes
                r.saved_bytes = prof.saved_bytes
                for c in prof.calls:
                    key = f"{c.kind} {str(c.dtype).removeprefix('torch.')}"
                    r.comm_by_dtype[key] = r.comm_by_dtype.get(key, 0.0) + c.nbytes / 2**20
        names = list(steps)
        for i in range(cfg.warmup + cfg.reps):
            # Interleaved, and rotated each round (A B C, B C A, ...): each candidate's place in
            # the round moves, so none always runs first, right after the GEMM probe.
            for name in names[i % len(names) :] + names[: i % len(names)]:
                step = steps[name]
                if step is None and res[name].note:
                    continue
                if name == "dense":
                    torch.set_num_threads(dense_threads)
                sync(device)
                dist.barrier()
                faults = minor_faults()
                t = time.perf_counter()
                if step is not None:
                    step()
                sync(device)
                elapsed = time.perf_counter() - t
                faults = -1 if faults is None else minor_faults() - faults  # -1: not counted
                torch.set_num_threads(threads)
                if name == "dense":
                    elapsed, faults = (elapsed, faults) if rank == 0 else (0.0, -1)
                slowest = torch.tensor([elapsed, faults], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if i >= cfg.warmup:
                    res[name].times.append(slowest[0].item())
                    res[name].faults.append(slowest[1].item())
            rate = probe()
            if i >= cfg.warmup:
                rates.append(rate)
        if cfg.profile:
            write_profiles(cfg, dtype_name, steps, rank)
        rate = statistics.median(rates)
        for r in res.values():
            r.gemm_rate = rate  # type: ignore[attr-defined]
        results.extend(res.values())
    return results


def _faults(per_round: list[float]) -> float | None:
    """The median step's page faults; None where no rank could count them."""
    median = statistics.median(per_round) if per_round else -1
    return None if median < 0 else median


def summarize(cfg: BenchConfig, results: list[Result], world: int, device: str) -> dict:
    rows = []
    for r in results:
        if not r.times:
            rows.append({"name": r.name, "dtype": r.dtype, "note": r.note})
            continue
        q = statistics.quantiles(r.times, n=10) if len(r.times) >= 2 else [r.times[0]] * 9
        med = statistics.median(r.times)
        achieved = r.flops_per_step / med / 1e9
        machine = r.gemm_rate  # type: ignore[attr-defined]
        # MFU: the whole machine's rate over the peak of its `world` devices (the probe sums the ranks).
        devices = 1 if cfg.fake_world is not None else world
        peak_all = cfg.peak_tflops * 1e3 * devices if cfg.peak_tflops is not None else machine
        rows.append({
            "name": r.name, "dtype": r.dtype, "median_ms": med * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3,
            "tokens_per_s": cfg.tokens / med, "gflops": achieved, "gemm_fraction": achieved / machine,
            "mfu": achieved / peak_all,
            "collectives": r.collectives, "comm_mib": r.comm_bytes / 2**20, "peak_mib": r.peak_bytes / 2**20,
            "saved_mib": r.saved_bytes / 2**20, "minor_faults_per_step": _faults(r.faults), "comm_mib_by_dtype": r.comm_by_dtype,
            "reps": len(r.times), "times_ms": [t * 1e3 for t in r.times], "note": r.note,
        })  # fmt: skip
    for dtype in cfg.dtypes:
        base = {r["name"]: r for r in rows if r["dtype"] == dtype and "median_ms" in r}
        for r in rows:
            if r["dtype"] == dtype and "median_ms" in r:
                for ref in REFERENCES:
                    if ref in base:
                        # Paired: the ratio within each round (the two steps ran seconds apart), then
                        # the median over rounds; slow drifts of a shared machine cancel out.
                        pairs = [a / b for a, b in zip(r["times_ms"], base[ref]["times_ms"])]
                        r[f"vs_{ref}"] = statistics.median(pairs)
                        r[f"vs_{ref}_of_medians"] = r["median_ms"] / base[ref]["median_ms"]
    rates = {r.dtype: r.gemm_rate for r in results}  # type: ignore[attr-defined]
    devices = 1 if cfg.fake_world is not None else world  # the probe is summed over the ranks that computed
    if cfg.peak_tflops is not None:
        peak = {"tflops_per_device": {d: cfg.peak_tflops for d in rates}, "source": "--peak-tflops"}
    else:
        peak = {"tflops_per_device": {d: v / devices / 1e3 for d, v in rates.items()}, "source": "GEMM probe, this run"}
    return {"config": asdict(cfg), "world_size": world, "fake_world": cfg.fake_world, "compiled": cfg.compile,
            "device": device, "threads_per_rank": torch.get_num_threads(),
            "gemm_rate_gflops": rates, "peak": peak, "rows": rows}  # fmt: skip


def print_table(summary: dict) -> None:
    cfg = summary["config"]
    print(
        f"\nFFN dim {cfg['dim']}, hidden {cfg['hidden_dim']}, {cfg['tokens']} tokens, forward+backward; "
        f"world size {summary['world_size']}"
        f"{' (fake process group: one rank computes, nothing is communicated)' if summary.get('fake_world') else ''}"
        f"{', compiled' if summary.get('compiled') else ''} on {summary['device']}, {summary['threads_per_rank']} thread(s) per rank; "
        f"machine GEMM rate {', '.join(f'{k} {v:.0f}' for k, v in summary['gemm_rate_gflops'].items())} GFLOP/s; "
        f"MFU against {', '.join(f'{k} {v:.4g}' for k, v in summary['peak']['tflops_per_device'].items())} TFLOP/s "
        f"per device ({summary['peak']['source']})"
    )
    head = f"{'candidate':<17} {'dtype':<9} {'median ms':>9} {'p10-p90 ms':>14} {'tokens/s':>9} {'GFLOP/s':>8} {'of GEMM':>7} {'MFU':>5} {'vs local':>8} {'vs fairsc':>9} {'vs torch':>8} {'vs dense':>8} {'vs act4':>7} {'collectives/step':<28} {'MiB moved':>9} {'peak MiB':>8} {'saved MiB':>9}"
    print(head)
    for r in summary["rows"]:
        if "median_ms" not in r:
            print(f"{r['name']:<17} {r['dtype']:<9} skipped: {r['note']}")
            continue
        coll = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "none"
        rel = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        print(
            f"{r['name']:<17} {r['dtype']:<9} {r['median_ms']:>9.1f} {r['p10_ms']:>6.1f}-{r['p90_ms']:<7.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['gflops']:>8.1f} {r['gemm_fraction']:>7.2f} {r['mfu']:>5.2f} {rel('vs_local'):>8} {rel('vs_fairscale'):>9} {rel('vs_torch-tp'):>8} "
            f"{rel('vs_dense'):>8} {rel('vs_tp-autograd-act'):>7} "
            f"{coll:<28} {r['comm_mib']:>9.1f} {r['peak_mib']:>8.1f} {r['saved_mib']:>9.1f}"
        )


def markdown(summary: dict) -> str:
    """The table as Markdown, for docs/benchmarks.md."""
    lines = [
        "| candidate | dtype | median ms | p10-p90 ms | tokens/s | GFLOP/s | of GEMM rate | MFU | vs local | vs fairscale "
        "| vs torch-tp | vs dense | vs tp-autograd-act | collectives/step | MiB moved | peak MiB | saved MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        if "median_ms" not in r:
            lines.append(f"| {r['name']} | {r['dtype']} | skipped: {r['note']} |" + " |" * 14)
            continue
        coll = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "none"
        rel = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['gflops']:.1f} | {r['gemm_fraction']:.2f} | {r['mfu']:.2f} | {rel('vs_local')} "
            f"| {rel('vs_fairscale')} | {rel('vs_torch-tp')} | {rel('vs_dense')} | {rel('vs_tp-autograd-act')} | {coll} "
            f"| {r['comm_mib']:.1f} | {r['peak_mib']:.1f} | {r['saved_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = summary["config"]["dtypes"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in summary["rows"] if r["dtype"] == dtype and "median_ms" in r]
        names = [r["name"] for r in rows]
        med = [r["median_ms"] for r in rows]
        err = [[m - r["p10_ms"] for m, r in zip(med, rows)], [r["p90_ms"] - m for m, r in zip(med, rows)]]
        colors = [
            "tab:green" if n.startswith("tp-") else "tab:gray" if n in ("local", "dense") else "tab:red" for n in names
        ]
        ax.barh(names, med, xerr=err, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("step time, ms (median, p10-p90)")
        ax.set_title(
            f"{dtype}: dim {summary['config']['dim']}, hidden {summary['config']['hidden_dim']}, {summary['config']['tokens']} tokens, W={summary['world_size']}"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"bench.py: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not cfg.fake_worlds:
        return bench_once(cfg, cuda)
    # Several fake sizes: one process, so CUDA and the libraries start once (the GPU check's time).
    for world in cfg.fake_worlds:
        rc = bench_once(replace(cfg, fake_world=world, fake_worlds=(), out=str(Path(cfg.out) / f"fake-{world}")), cuda)
        if rc:
            return rc
    return 0


def bench_once(cfg: BenchConfig, cuda: bool) -> int:
    """One benchmark: its process group (the fake one of ``cfg.fake_world`` ranks, or torchrun's)
    set up, every candidate run, the table printed and written to ``cfg.out``, the group destroyed."""
    if cfg.fake_world is not None:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.fake_world)
    else:
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "0")
            )
        # The step times and GEMM rates are reduced as CPU tensors: gloo carries those beside NCCL.
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
    try:
        cfg, note = skip_slow_bf16(
            cfg, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        )
        if note and dist.get_rank() == 0:
            print(f"bench.py: {note}", flush=True)
        if not cfg.dtypes:
            return 0
        results = run(cfg)
        world = dist.get_world_size()
        device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
        if dist.get_rank() == 0:
            summary = summarize(cfg, results, world, device)
            if note:
                summary["skipped"] = {"bfloat16": note}
            print_table(summary)
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.json").write_text(json.dumps(summary, indent=1))
            (out / "bench.md").write_text(markdown(summary))
            plot(summary, out / "bench.png")
            print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
