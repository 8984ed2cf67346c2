"""Training step (forward + backward) of an MoE layer: tp_ffn's MoE block against Hugging Face's own.

    # one process (W=1): ParallelMoEFeedForward against transformers' Qwen2MoeSparseMoeBlock
    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py --preset tiny
    # two gloo ranks (W=2): against the same HF block with each expert (and the shared expert)
    # parallelized on its own, which is what tp_ffn.hf.parallelize_mlp did before it took MoE blocks whole
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_moe.py --preset cpu
    # a GPU node (NCCL), one Qwen1.5-MoE-A2.7B layer, bf16 autocast
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_moe.py --preset qwen1.5-moe-a2.7b --dtype bfloat16

Candidates, all on the same weights (one HF block drawn from ``--seed``, stacked into ours) and tokens:

===============  =====================================================================================
hf               transformers' ``Qwen2MoeSparseMoeBlock`` as it runs (loop over experts); W=1 only
hf-per-expert    the same block with every expert and the shared expert made a ``ParallelMLP`` of its
                 own (what ``tp_ffn.hf.parallelize_mlp`` did before it took MoE blocks whole), one
                 all-reduce each way per expert, tokens or not
moe              ``tp_ffn.ParallelMoEFeedForward`` (grouped GEMMs where ``torch._grouped_mm`` takes them)
moe-loop         the same with ``grouped_gemm=False``: one GEMM per expert with tokens
===============  =====================================================================================

The reference is ``hf`` at W=1 and ``hf-per-expert`` at W>1. After one warm-up step each (and one
instrumented step: collectives forward and backward, their bytes, the bytes autograd keeps for backward,
peak CUDA memory), the candidates run interleaved and rotated (A B C, B C A, ...) for ``--reps`` rounds,
each step between barriers, a step's time the slowest rank's. Reported: median step time, its p10-p90
spread, the paired ratio to the reference (median over rounds of the ratio within a round), tokens/s,
collectives per step (forward / backward, by kind) and the bytes they carry, and the activations
saved per token (every buffer autograd keeps between forward and backward, parameters excluded,
index vectors included). JSON goes to ``--out`` (``runs/`` is not tracked).

Figures taken on a machine shared with other work are noise: take them on a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from tp_ffn import MoEConfig, MoEFeedForward, ParallelMoEFeedForward

# _Collectives: count_collectives' dispatch mode, which also adds up the bytes each collective carries.
from tp_ffn.diagnostics import _Collectives, saved_for_backward

# dim, experts, top_k, expert hidden, shared expert hidden, tokens per step
PRESETS = {
    "tiny": (64, 8, 2, 64, 128, 256),
    "cpu": (512, 16, 2, 512, 1024, 1024),
    "qwen1.5-moe-a2.7b": (2048, 60, 4, 1408, 5632, 4096),
    "qwen2-57b-a14b": (3584, 64, 8, 2560, 20480, 4096),
}
ALL = ("hf", "hf-per-expert", "moe", "moe-loop")


@dataclass(frozen=True)
class BenchConfig:
    dim: int
    experts: int
    top_k: int
    hidden: int
    shared: int
    tokens: int
    dtype: str
    candidates: tuple[str, ...]
    reps: int
    warmup: int
    seed: int
    out: str

    def __post_init__(self) -> None:
        for name in ("dim", "experts", "top_k", "hidden", "tokens", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.shared < 1:
            raise ValueError(
                f"--shared: expected >= 1 (Qwen2-MoE's block always has a shared expert), got {self.shared}"
            )
        if self.top_k > self.experts:
            raise ValueError(f"--top-k: expected at most --experts ({self.experts}), got {self.top_k}")
        unknown = sorted(set(self.candidates) - set(ALL))
        if unknown or not self.candidates:
            raise ValueError(f"--candidates: expected a non-empty subset of {list(ALL)}, got {list(self.candidates)}")


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    forward: dict[str, int] = field(default_factory=dict)
    backward: dict[str, int] = field(default_factory=dict)
    comm_bytes: int = 0
    saved_bytes: int = 0
    peak_bytes: int | None = None
    output_rel_diff: float = 0.0  # against the first candidate's output: the same computation


def parse_args(argv: list[str] | None, world: int) -> BenchConfig:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name in ("dim", "experts", "top-k", "hidden", "shared", "tokens"):
        p.add_argument(f"--{name}", type=int, help="overrides the preset")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast over fp32 weights"
    )
    default = "hf,moe,moe-loop" if world == 1 else "hf-per-expert,moe,moe-loop"
    p.add_argument(
        "--candidates", default=default, help=f"comma-separated subset of {','.join(ALL)} (default {default})"
    )
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_moe")
    a = p.parse_args(argv)
    preset = dict(zip(("dim", "experts", "top_k", "hidden", "shared", "tokens"), PRESETS[a.preset]))
    for key in preset:
        if getattr(a, key) is not None:
            preset[key] = getattr(a, key)
    candidates = tuple(c for c in a.candidates.split(",") if c)
    if world > 1 and "hf" in candidates:
        raise ValueError("--candidates: 'hf' runs the whole block in one process; with W > 1 use hf-per-expert")
    return BenchConfig(
        **preset, dtype=a.dtype, candidates=candidates, reps=a.reps, warmup=a.warmup, seed=a.seed, out=a.out
    )


def build_hf(cfg: BenchConfig, device: torch.device) -> torch.nn.Module:
    """transformers' Qwen2-MoE block (softmax top-k routing without renormalisation, a shared expert
    with its sigmoid gate), drawn from ``--seed``."""
    import transformers
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = transformers.Qwen2MoeConfig(
        hidden_size=cfg.dim, num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.hidden,
        shared_expert_intermediate_size=cfg.shared, norm_topk_prob=False, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    return Qwen2MoeSparseMoeBlock(hf_cfg).to(device)


def ours_from_hf(block: torch.nn.Module, cfg: BenchConfig) -> MoEFeedForward:
    """Qwen2-MoE's per-expert keys stacked into the block's layout (``docs/moe.md``)."""
    config = MoEConfig(
        cfg.experts, cfg.top_k, cfg.hidden, shared_hidden_dim=cfg.shared, shared_expert_gate=True,
        norm_topk_prob=False,
    )  # fmt: skip
    sd = {"router.weight": block.gate.weight}
    for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        sd[f"experts.{ours}"] = torch.stack([getattr(e, theirs).weight for e in block.experts])
        sd[f"shared_expert.{ours}.weight"] = getattr(block.shared_expert, theirs).weight
    sd["shared_expert_gate.weight"] = block.shared_expert_gate.weight
    dense = MoEFeedForward(cfg.dim, config, device="meta")
    dense.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True)
    return dense


def build(name: str, block: torch.nn.Module, dense: MoEFeedForward) -> torch.nn.Module:
    if name == "hf":
        return block
    if name == "hf-per-expert":
        from tp_ffn.hf import parallelize_mlp

        # What tp_ffn.hf did before it took MoE blocks whole: every expert and the shared expert made a ParallelMLP
        # of its own (parallelize_mlp now replaces the whole block by one ParallelSparseMoeBlock).
        per_expert = copy.deepcopy(block)
        parallelize_mlp(per_expert.experts, dist.group.WORLD)
        holder = torch.nn.Module()
        holder.shared_expert = per_expert.shared_expert
        parallelize_mlp(holder, dist.group.WORLD)
        per_expert.shared_expert = holder.shared_expert
        return per_expert
    return ParallelMoEFeedForward.from_dense(dense, group=dist.group.WORLD, grouped_gemm=name == "moe")


def make_step(module: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, autocast: bool) -> Callable[[], None]:
    xl = x.detach().requires_grad_()

    def step() -> None:
        xl.grad = None
        for p in module.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = module(xl)
        y = y[0] if isinstance(y, tuple) else y  # HF blocks return (y, router_logits)
        y.backward(gy.to(y.dtype))

    return step


def instrument(module: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, autocast: bool, r: Result) -> torch.Tensor:
    """One step with its collectives counted (forward and backward apart) and their bytes, the bytes
    saved for backward and (CUDA) the peak memory above what was live before. Returns the output."""
    xl = x.detach().requires_grad_()
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    fwd, bwd = _Collectives(), _Collectives()
    with fwd, saved_for_backward(module.parameters()) as saved:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = module(xl)
    y = y[0] if isinstance(y, tuple) else y
    with bwd:
        y.backward(gy.to(y.dtype))
    if cuda:
        torch.cuda.synchronize(x.device)
        r.peak_bytes = torch.cuda.max_memory_allocated(x.device) - base
    r.forward, r.backward = dict(fwd.counts), dict(bwd.counts)
    r.comm_bytes, r.saved_bytes = fwd.nbytes + bwd.nbytes, saved.nbytes
    return y.detach().float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: BenchConfig) -> tuple[dict[str, Result], dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    block = build_hf(cfg, device)
    dense = ours_from_hf(block, cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(1, cfg.tokens, cfg.dim, generator=g).to(device)
    gy = torch.randn(1, cfg.tokens, cfg.dim, generator=g).to(device)
    autocast = cfg.dtype == "bfloat16"
    modules = {name: build(name, block, dense) for name in cfg.candidates}
    steps = {name: make_step(m, x, gy, autocast) for name, m in modules.items()}
    res = {name: Result(name) for name in cfg.candidates}
    # Routing as the blocks see it: how many experts got no token (the per-expert path still reduces for them).
    with torch.no_grad():
        idx = torch.topk(block.gate(x.reshape(-1, cfg.dim)).softmax(-1), cfg.top_k, dim=-1).indices
    empty = int((idx.reshape(-1).bincount(minlength=cfg.experts) == 0).sum())
    first = None
    for name, step in steps.items():
        step()
        y = instrument(modules[name], x, gy, autocast, res[name])
        first = y if first is None else first
        res[name].output_rel_diff = ((y - first).norm() / first.norm()).item()
        dist.barrier()
    names = list(steps)
    for i in range(cfg.warmup + cfg.reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            sync(device)
            dist.barrier()
            t = time.perf_counter()
            steps[name]()
            sync(device)
            slowest = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if i >= cfg.warmup:
                res[name].times.append(slowest.item())
    return res, {"experts_without_tokens": empty}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(cfg: BenchConfig, res: dict[str, Result], extra: dict, world: int, device: str) -> dict:
    reference = "hf" if world == 1 else "hf-per-expert"
    rows = []
    for r in res.values():
        median = statistics.median(r.times)
        row = {
            "name": r.name,
            "median_ms": 1e3 * median,
            "p10_ms": 1e3 * _pct(r.times, 0.1),
            "p90_ms": 1e3 * _pct(r.times, 0.9),
            "tokens_per_s": cfg.tokens / median,
            "collectives_forward": r.forward,
            "collectives_backward": r.backward,
            "collectives_per_step": sum(r.forward.values()) + sum(r.backward.values()),
            "comm_bytes_per_step": r.comm_bytes,
            "saved_bytes_per_token": r.saved_bytes / cfg.tokens,
            "peak_bytes": r.peak_bytes,
            "output_rel_diff_to_first": r.output_rel_diff,
        }
        if reference in res and r.name != reference:
            ref = res[reference].times
            row[f"paired_ratio_to_{reference}"] = statistics.median(a / b for a, b in zip(r.times, ref))
        rows.append(row)
    return {
        "script": "benchmarks/bench_moe.py",
        "config": asdict(cfg),
        "world": world,
        "device": device,
        "torch": torch.__version__,
        "threads_per_rank": torch.get_num_threads(),
        "reference": reference if reference in res else None,
        **extra,
        "candidates": rows,
        "note": "figures from a machine shared with other work are noise",
    }


def print_table(summary: dict) -> None:
    ref = summary["reference"]
    print(f"W={summary['world']} on {summary['device']}, {summary['config']['dtype']}, "
          f"{summary['experts_without_tokens']} experts without tokens")  # fmt: skip
    print(
        f"{'candidate':<15}{'median ms':>11}{'p10-p90 ms':>17}{'vs ' + str(ref):>18}{'coll/step':>11}{'saved B/token':>15}"
    )
    for row in summary["candidates"]:
        ratio = row.get(f"paired_ratio_to_{ref}")
        spread = f"{row['p10_ms']:.2f}-{row['p90_ms']:.2f}"
        print(
            f"{row['name']:<15}{row['median_ms']:>11.2f}{spread:>17}{'' if ratio is None else f'{ratio:.3f}':>18}"
            f"{row['collectives_per_step']:>11}{row['saved_bytes_per_token']:>15.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "0")
        )
    try:
        cfg = parse_args(argv, int(os.environ["WORLD_SIZE"]))
    except ValueError as e:
        print(f"bench_moe.py: {e}", file=sys.stderr)
        return 2
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
    try:
        res, extra = run(cfg)
        if dist.get_rank() == 0:
            device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
            summary = summarize(cfg, res, extra, dist.get_world_size(), device)
            print_table(summary)
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"bench_moe_w{dist.get_world_size()}.json"
            path.write_text(json.dumps(summary, indent=1))
            print(f"wrote {path}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
