"""Check a sharded ParallelFeedForward against the dense block on your own cluster.

    torchrun --nproc_per_node 2 benchmarks/parity.py                      # CPU: gloo
    torchrun --nproc_per_node 8 benchmarks/parity.py --dtype bfloat16 \\
        --dim 4096 --hidden-dim 11008 --sequence-parallel              # GPUs: NCCL
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 benchmarks/parity.py                   # several nodes
    torchrun --nproc_per_node 2 benchmarks/parity.py --backend gloo \\
        --device cuda:0                                                # 2 ranks on one GPU (gloo)

Builds a dense FeedForward with a fixed seed on every rank, shards it over all ranks (NCCL when
CUDA is available, gloo otherwise; ``--backend`` and ``--device`` choose: with ``--device cuda:0``
every rank uses that GPU, which gloo allows and NCCL does not), runs one forward and backward, and prints on rank 0: the max
abs / relative error of the output, the input gradient and every weight gradient against a float64
dense reference and against the single-process pretraining_tp emulation at k = world size, the
collectives counted in forward and backward against the expected ones, and each rank's shard
shapes. Exits 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tp_ffn import FeedForward, ParallelFeedForward, emulate_pretraining_tp, gather_sequence, split_sequence
from tp_ffn.comm import all_gather_along
from tp_ffn.diagnostics import count_collectives
from tp_ffn.ffn import ACTIVATIONS
from tp_ffn.shutdown import exit_without_teardown

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Relative (Frobenius) tolerance against the float64 reference: a few ulps of the compute dtype.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Against the emulation in the same dtype the slices are the shards: only summation order differs.
EMULATION_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class ParityConfig:
    dim: int = 256
    hidden_dim: int = 688
    bias: bool = False
    activation: str = "silu"
    sequence_parallel: bool = False
    dtype: str = "float32"
    batch: int = 2
    seq: int = 12  # divisible by every world size up to 4, and 6
    seed: int = 0
    rtol: float | None = None
    backend: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"--backend: expected auto, nccl or gloo, got {self.backend!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.removeprefix("cuda:").isdigit()):
            raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("--backend nccl: needs a CUDA device, got --device cpu")
        for name in ("dim", "hidden_dim", "batch", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def tolerance(self) -> float:
        return self.rtol if self.rtol is not None else TOLERANCES[DTYPES[self.dtype]]

    @property
    def emulation_tolerance(self) -> float:
        return self.rtol if self.rtol is not None else EMULATION_TOLERANCES[DTYPES[self.dtype]]


def parse_args(argv: list[str] | None = None) -> ParityConfig:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=688, help="intermediate size (uneven over the ranks is fine)")
    p.add_argument("--bias", action="store_true")
    p.add_argument("--activation", default="silu", choices=sorted(ACTIVATIONS))
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument(
        "--seq",
        type=int,
        default=12,
        help="full sequence length (a multiple of the world size with SP; 12 fits 1-4 and 6)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by dtype)")
    p.add_argument("--backend", default="auto", help="auto (NCCL when CUDA is available, else gloo), nccl or gloo")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda (cuda:LOCAL_RANK) or cuda:N (every rank)",
    )
    a = p.parse_args(argv)
    return ParityConfig(
        a.dim, a.hidden_dim, a.bias, a.activation, a.sequence_parallel, a.dtype, a.batch, a.seq, a.seed, a.rtol,
        a.backend, a.device,
    )  # fmt: skip


def resolve_device(cfg: ParityConfig) -> tuple[torch.device, str]:
    """The device this rank computes on and the backend, from ``--device`` and ``--backend``."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cfg.device == "auto":
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    elif cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and not cuda:
        raise ValueError(f"--device {cfg.device}: CUDA is not available")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"--backend nccl: needs a CUDA device, got {device}")
    return device, backend


def expected_collectives(
    world: int, sp: bool, bias: bool, backend: str = "nccl", device: str = "cuda"
) -> tuple[Counter, Counter]:
    if world == 1:
        return Counter(), Counter()
    if not sp:
        return Counter(all_reduce=1), Counter(all_reduce=1)
    # On gloo with CPU tensors a reduce-scatter runs as an all-to-all and a sum (tp_ffn.comm._sums_by_all_to_all).
    scatter = "all_to_all" if backend == "gloo" and device == "cpu" else "reduce_scatter"
    return Counter({"all_gather": 1, scatter: 1}), Counter({"all_gather": 1, scatter: 1, "all_reduce": int(bias)})


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = (got - want).norm().item()
    return (got - want).abs().max().item(), diff / max(want.norm().item(), 1e-300)


def run(cfg: ParityConfig, device: torch.device) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[cfg.dtype]
    if cfg.hidden_dim < world:
        raise ValueError(
            f"--hidden-dim: expected at least one row per rank (>= the world size {world}), got {cfg.hidden_dim}"
        )
    if cfg.sequence_parallel and cfg.seq % world:
        raise ValueError(
            f"--seq: expected a multiple of the world size {world} with --sequence-parallel, got {cfg.seq}"
        )

    torch.manual_seed(cfg.seed)
    dense = FeedForward(cfg.dim, cfg.hidden_dim, bias=cfg.bias, activation=cfg.activation)
    x = torch.randn(cfg.batch, cfg.seq, cfg.dim)
    gy = torch.randn(cfg.batch, cfg.seq, cfg.dim)

    # Float64 dense reference on the CPU.
    ref = FeedForward.from_state_dict({k: v.double() for k, v in dense.state_dict().items()}, activation=cfg.activation)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.backward(gy.double())
    want = {"output": y64, "input grad": x64.grad}
    want.update({f"grad {k}": p.grad for k, p in ref.named_parameters()})

    # Single-process emulation with k = world size, in the compute dtype on the compute device.
    emu = FeedForward.from_state_dict(
        {k: v.to(device, dtype) for k, v in dense.state_dict().items()}, activation=cfg.activation
    )
    xe = x.to(device, dtype).requires_grad_()
    ye = emulate_pretraining_tp(emu, xe, world)
    ye.backward(gy.to(device, dtype))
    emulated = {"output": ye, "input grad": xe.grad}
    emulated.update({f"grad {k}": p.grad for k, p in emu.named_parameters()})

    # The sharded block.
    par = ParallelFeedForward.from_dense(
        {k: v.to(dtype) for k, v in dense.state_dict().items()}, sequence_parallel=cfg.sequence_parallel,
        activation=cfg.activation, device=device,
    )  # fmt: skip
    group = par.tp.group
    shard = (lambda t: split_sequence(t, group)) if cfg.sequence_parallel else (lambda t: t)
    xl = shard(x.to(device, dtype)).detach().requires_grad_()
    with count_collectives() as fwd:
        y = par(xl)
    with count_collectives() as bwd:
        y.backward(shard(gy.to(device, dtype)))
    g, sizes = group, par.w1.shard_sizes
    # The report's own gathers: on the CPU under gloo (which handles every collective there).
    report = (lambda t: t.detach().cpu()) if dist.get_backend() == "gloo" else (lambda t: t.detach())
    got = {
        "output": gather_sequence(report(y), g) if cfg.sequence_parallel else y,
        "input grad": gather_sequence(report(xl.grad), g) if cfg.sequence_parallel else xl.grad,
    }
    for name in ("w1", "w2", "w3"):
        layer = getattr(par, name)
        dim = 1 if name == "w2" else 0
        got[f"grad {name}.weight"] = all_gather_along(report(layer.weight.grad), g, dim, sizes)
        if layer.bias is not None:
            got[f"grad {name}.bias"] = (
                layer.bias.grad if name == "w2" else all_gather_along(report(layer.bias.grad), g, 0, sizes)
            )

    # Rank 0 prints; every rank's verdict is combined so that all exit alike.
    tol, tol_emu = cfg.tolerance, cfg.emulation_tolerance
    ok = True
    rows = []
    for name, ref_t in want.items():
        abs_ref, rel_ref = errors(got[name], ref_t)
        abs_emu, rel_emu = errors(got[name], emulated[name])
        passed = rel_ref <= tol and rel_emu <= tol_emu
        ok &= passed
        rows.append(
            f"{name:<16} {abs_ref:>12.3e} {rel_ref:>12.3e} {abs_emu:>12.3e} {rel_emu:>12.3e}  {'ok' if passed else 'FAIL'}"
        )
    want_fwd, want_bwd = expected_collectives(world, cfg.sequence_parallel, cfg.bias, dist.get_backend(), device.type)
    coll_ok = fwd == want_fwd and bwd == want_bwd
    ok &= coll_ok
    shapes = [None] * world
    dist.all_gather_object(shapes, {n: tuple(p.shape) for n, p in par.named_parameters()})
    verdicts = [None] * world
    dist.all_gather_object(verdicts, ok)
    ok = all(verdicts)

    if rank == 0:
        print(
            f"tp_ffn parity: world size {world} ({dist.get_backend()} on {device.type}), dim {cfg.dim}, hidden {cfg.hidden_dim}, "
            f"bias {cfg.bias}, activation {cfg.activation}, sequence parallel {cfg.sequence_parallel}, dtype {cfg.dtype}, "
            f"tokens {cfg.batch}x{cfg.seq}"
        )
        print(f"\n{'':<16} {'vs float64 dense reference':^25} {'vs emulation (k = W)':^25}")
        print(f"{'tensor':<16} {'max abs err':>12} {'rel err':>12} {'max abs err':>12} {'rel err':>12}")
        print("\n".join(rows))
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
        print(f"\ncollectives  forward: {fmt(fwd)} (expected {fmt(want_fwd)})")
        print(f"             backward: {fmt(bwd)} (expected {fmt(want_bwd)})  {'ok' if coll_ok else 'FAIL'}")
        print("\nshards")
        for r, s in enumerate(shapes):
            print(f"  rank {r}: " + ", ".join(f"{n} {list(v)}" for n, v in s.items()))
        print(f"\ntolerance (relative, Frobenius): {tol:.0e} vs the reference, {tol_emu:.0e} vs the emulation")
        print("PASS" if ok else "FAIL: see the rows marked FAIL above")
    return ok


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"parity.py: error: {e}", file=sys.stderr)
        return 2
    try:
        device, backend = resolve_device(cfg)
    except ValueError as e:
        print(f"parity.py: error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # plain `python benchmarks/parity.py`: a world of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "0")
        )
    dist.init_process_group(backend)
    try:
        ok = run(cfg, device)
    except (ValueError, TypeError) as e:  # bad arguments for this world size: the same on every rank
        if dist.get_rank() == 0:
            print(f"parity.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
