"""The parts of a tensor-parallel FFN step, timed one by one: why a mode pays or does not.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_parts.py --preset cpu

Every rank runs each probe at once, after a barrier; a probe's time is the slowest rank's median
over ``--reps`` runs. Probes, at the block's shard shapes (``T`` tokens, ``D`` dim, ``n`` = hidden / W):

==========================  ===================================================================
all-reduce                  one all-reduce of the ``[T, D]`` output: sync, async in place + wait,
                            and functional (``torch.ops._c10d_functional``) + wait
gemm                        the down projection's GEMM ``[T, n] x [n, D]`` alone
gemm + all-reduce           the GEMM, then its all-reduce: the unhidden forward of ``tp-plain``
chunked k                   the GEMM in k token chunks, each chunk's all-reduce started at once and
                            waited for at the end: the forward of ``comm_chunks=k``
3 gemm + all-reduce ...     an all-reduce started (in place, as eager ``overlap_comm`` does, or
                            functional, as under torch.compile), three GEMMs, then the wait: the
                            backward overlap (the weight-gradient GEMMs hide the all-reduce)
gate/up unfused | fused     forward, input-gradient and weight-gradient GEMMs of w1 and w3, as two
                            GEMMs or one on the concatenated shards: ``fuse_gate_up``
fp32 all-reduce ...         with ``--dtype bfloat16``: the input-gradient all-reduce as the bench's
                            autocast step runs it, in fp32 (the input's dtype, 2x the bytes of
                            bf16), alone and behind three bf16 GEMMs: whether the overlap still
                            hides it where bf16 GEMMs are fast (where a bf16 step loses against
                            ``local``)
reduce-scatter ...          sequence parallelism's collectives on ``[T, D]`` along the tokens: the
                            backend's own reduce-scatter (of the input cast to fp32 for the "fp32"
                            rows) against ``tp_ffn.comm.reduce_scatter_sequence_blocks``, which on
                            gloo (and, for a gradient summed in a wider dtype, everywhere) sends
                            the blocks by all-to-all and sums them on arrival; alone and behind
                            three GEMMs
all-gather + fp32 sum ...   with ``--dtype bfloat16``: the plain mode's fp32 input-gradient
                            all-reduce done as an all-gather of the bf16 partial gradients and
                            their sum in fp32 (half the bytes, the same bits at two ranks):
                            alone and behind three GEMMs, beside the fp32 all-reduce rows
swiglu ...                  the elementwise work of ``act(g) * u`` (silu) on ``[T, n]``: forward;
                            backward as autograd runs it from the kept ``act(g)`` (the previous
                            default) and as the two-tensor SwiGLU runs it, recomputing ``act(g)``
                            and ``h`` from ``g`` and ``u`` (here into one buffer more than the
                            block uses: the probe cannot hand it ``dh`` to overwrite); each as one
                            compiled kernel (tp_ffn/swiglu_kernels.py) and as ATen's eager kernels
==========================  ===================================================================

A table is printed and JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_ffn.shutdown import exit_without_teardown
from tp_ffn import swiglu_kernels
from tp_ffn.comm import reduce_scatter_sequence_blocks
from tp_ffn.swiglu import act_mul, act_mul_backward

PRESETS = {"cpu": (1024, 2816, 2048), "tiny": (256, 704, 512), "llama2-7b": (4096, 11008, 8192)}

_c10d = torch.ops._c10d_functional


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """The slowest rank's median time of ``fn`` in ms (one untimed warm-up run)."""
    times = []
    for i in range(reps + 1):
        _sync(device)
        dist.barrier()
        t = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    med = torch.tensor(statistics.median(times) * 1e3)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def probes(dim: int, n: int, tokens: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], object]]:
    group = dist.group.WORLD
    world = group.size()
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, h = rand(tokens, dim), rand(tokens, n)
    y = torch.zeros(tokens, dim, device=device, dtype=dtype)  # reduced over and over: stays finite
    y32 = torch.zeros(tokens, dim, device=device, dtype=torch.float32)
    w1, w3, w2 = rand(n, dim), rand(n, dim), rand(dim, n)
    w13 = torch.cat((w1, w3))
    dg, du = rand(tokens, n), rand(tokens, n)
    d = torch.cat((dg, du), dim=1)
    gate, up, dh = rand(tokens, n), rand(tokens, n), rand(tokens, n)
    act = F.silu(gate)

    def swiglu_backward_autograd() -> None:
        # What autograd runs for act(g) * u with act(g) kept: MulBackward, then SiluBackward.
        dh * act, torch.ops.aten.silu_backward(dh * up, gate)

    def no_grad(fn: Callable[[], object], fused: bool = True) -> Callable[[], object]:
        def run() -> object:
            enabled, swiglu_kernels.ENABLED = swiglu_kernels.ENABLED, fused and swiglu_kernels.ENABLED
            try:
                with torch.no_grad():  # as inside an autograd Function: act_mul's eager paths
                    return fn()
            finally:
                swiglu_kernels.ENABLED = enabled

        return run

    def functional_all_reduce() -> None:
        _c10d.wait_tensor(_c10d.all_reduce(y, "sum", group.group_name))

    def gemm_then_all_reduce() -> None:
        dist.all_reduce(F.linear(h, w2))

    def chunked(k: int) -> Callable[[], object]:
        def run() -> torch.Tensor:
            outs, works = [], []
            for c in h.tensor_split(k):
                outs.append(F.linear(c, w2))
                works.append(dist.all_reduce(outs[-1], async_op=True))
            for work in works:
                work.wait()
            return torch.cat(outs)

        return run

    def overlapped_functional() -> None:
        pending = _c10d.all_reduce(y, "sum", group.group_name)
        for _ in range(3):
            F.linear(h, w2)
        _c10d.wait_tensor(pending)

    def reduce_scatter(t: torch.Tensor, into: torch.dtype) -> Callable[[], object]:
        """The backend's own reduce-scatter of ``t`` (cast to ``into`` first, as the block did)."""
        out = torch.empty(tokens // world, dim, device=device, dtype=into)

        def run() -> object:
            return dist.reduce_scatter_tensor(out, t.to(into), async_op=True)

        return run

    def by_blocks(t: torch.Tensor, into: torch.dtype) -> Callable[[], object]:
        """``reduce_scatter_sequence_blocks``: on gloo an all-to-all of ``t`` and a sum in ``into``."""
        return lambda: reduce_scatter_sequence_blocks(t, group, 0, dtype=into, async_op=True)[1]

    def gather_sum(t: torch.Tensor) -> Callable[[], object]:
        """All-gather the narrow ``t`` and sum the blocks in fp32, rank 0 first."""
        blocks = torch.empty(world * tokens, dim, device=device, dtype=t.dtype)

        class _Then:
            def __init__(self) -> None:
                self.work = dist.all_gather_into_tensor(blocks, t, async_op=True)

            def wait(self) -> torch.Tensor:
                self.work.wait()
                parts = blocks.view(world, tokens, dim)
                out = parts[0].float()
                for part in parts[1:]:
                    out += part
                return out

        return _Then

    def now(start: Callable[[], object]) -> Callable[[], None]:
        return lambda: start().wait()

    def behind_gemms(start: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            work = start()
            for _ in range(3):
                F.linear(h, w2)
            work.wait()

        return run

    def overlapped_inplace(buffer: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            work = dist.all_reduce(buffer, async_op=True)
            for _ in range(3):
                F.linear(h, w2)
            work.wait()

        return run

    return {
        "all-reduce (sync)": lambda: dist.all_reduce(y),
        "all-reduce (async in place + wait)": lambda: dist.all_reduce(y, async_op=True).wait(),
        "all-reduce (functional + wait)": functional_all_reduce,
        "gemm": lambda: F.linear(h, w2),
        "gemm + all-reduce": gemm_then_all_reduce,
        **{f"chunked {k}": chunked(k) for k in (2, 4, 8)},
        "3 gemm": lambda: [F.linear(h, w2) for _ in range(3)],
        "3 gemm + all-reduce in place": overlapped_inplace(y),
        "3 gemm + all-reduce functional": overlapped_functional,
        "gate/up forward, unfused": lambda: (F.linear(x, w1), F.linear(x, w3)),
        "gate/up forward, fused": lambda: F.linear(x, w13),
        "gate/up input grad, unfused": lambda: torch.addmm(dg @ w1, du, w3),
        "gate/up input grad, fused": lambda: d @ w13,
        "gate/up weight grad, unfused": lambda: (dg.t() @ x, du.t() @ x),
        "gate/up weight grad, fused": lambda: d.t() @ x,
        "fp32 all-reduce (sync)": lambda: dist.all_reduce(y32),
        "3 gemm + fp32 all-reduce in place": overlapped_inplace(y32),
        **(
            {}
            if world == 1
            else {
                "reduce-scatter, backend's (sync)": now(reduce_scatter(y, dtype)),
                "reduce-scatter, by blocks (sync)": now(by_blocks(y, dtype)),
                "3 gemm + reduce-scatter, backend's": behind_gemms(reduce_scatter(y, dtype)),
                "3 gemm + reduce-scatter, by blocks": behind_gemms(by_blocks(y, dtype)),
            }
        ),
        **(
            {}
            if world == 1 or dtype == torch.float32
            else {
                "fp32 reduce-scatter, backend's (sync)": now(reduce_scatter(y, torch.float32)),
                "fp32 reduce-scatter, by blocks (sync)": now(by_blocks(y, torch.float32)),
                "3 gemm + fp32 reduce-scatter, backend's": behind_gemms(reduce_scatter(y, torch.float32)),
                "3 gemm + fp32 reduce-scatter, by blocks": behind_gemms(by_blocks(y, torch.float32)),
                "all-gather + fp32 sum (sync)": now(gather_sum(y)),
                "3 gemm + all-gather + fp32 sum": behind_gemms(gather_sum(y)),
            }
        ),
        "swiglu forward": no_grad(lambda: act_mul(gate, up, "silu")),
        "swiglu forward, eager kernels": no_grad(lambda: act_mul(gate, up, "silu"), fused=False),
        "swiglu backward, act(g) kept": no_grad(swiglu_backward_autograd),
        "swiglu backward, recomputed": no_grad(lambda: act_mul_backward(dh, gate, up, "silu", need_h=True)),
        "swiglu backward, recomputed, eager kernels": no_grad(
            lambda: act_mul_backward(dh, gate, up, "silu", need_h=True), fused=False
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="dim, hidden dim, tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default="runs/bench", help="directory for bench_parts.json (runs/ is not tracked)")
    a = p.parse_args(argv)
    if a.reps < 1:
        print(f"bench_parts.py: --reps: expected >= 1, got {a.reps}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")  # medians are reduced as CPU tensors
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dim, hidden, tokens = PRESETS[a.preset]
        world = dist.get_world_size()
        dtype = getattr(torch, a.dtype)
        n = hidden // world
        rows = {name: timed(fn, a.reps, device) for name, fn in probes(dim, n, tokens, dtype, device).items()}
        if dist.get_rank() == 0:
            print(f"dim {dim}, shard {n} of hidden {hidden}, {tokens} tokens, {a.dtype}, world size {world}, "
                  f"{torch.get_num_threads()} thread(s) per rank; slowest rank's median of {a.reps}")  # fmt: skip
            for name, ms in rows.items():
                print(f"  {name:<40} {ms:8.2f} ms")
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            summary = {"preset": a.preset, "dtype": a.dtype, "world_size": world, "reps": a.reps, "ms": rows}
            (out / "bench_parts.json").write_text(json.dumps(summary, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # not sys.exit: see tp_ffn/shutdown.py
