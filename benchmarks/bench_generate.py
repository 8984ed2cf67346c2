"""Generation speed with and without the key/value cache, interleaved, at any TP size.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --preset small --prompt-len 64 --new-tokens 192
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_generate.py --preset small

The model is a preset with random weights (speed does not depend on them), or ``--init-from`` a
Hugging Face / Meta directory, or ``--ckpt-dir`` a training checkpoint. Each round generates
``--new-tokens`` greedily from the same random prompts twice, once with the cache and once
recomputing the whole context every token (``use_cache=False``), in alternating order. A run's
time is the slowest rank's; tokens/s counts the new tokens of the whole batch. Printed: the median
tokens/s of each, the median of the per-round ratios (cached / recomputed), and whether both
produced the same tokens. When prompt + new tokens exceed the model's ``max_seq_len`` the window
slides (see ``tp_ffn.train.run.generate``), in both. ``--out`` writes the figures as JSON.
Errors: one line on rank 0, exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from tp_ffn.models.llama import PRESETS, Transformer, load_pretrained
from tp_ffn.train.cli import ArgumentParser, run_cli
from tp_ffn.train.errors import UsageError
from tp_ffn.train.run.generate import generate, load_checkpoint_model
from tp_ffn.train.run.parallelize import init_runtime

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="bench_generate.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", choices=sorted(PRESETS), help="random weights of this shape")
    src.add_argument("--init-from", help="a Hugging Face or Meta checkpoint directory")
    src.add_argument("--ckpt-dir", help="a training --ckpt-dir or step_N directory")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--rounds", type=int, default=3, help="interleaved (cached, recomputed) pairs")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameters (preset / --init-from)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    return p


def _build(args: argparse.Namespace, device: torch.device) -> Transformer:
    dtype = DTYPES[args.dtype]
    if args.ckpt_dir:
        return load_checkpoint_model(args.ckpt_dir, device=device)[0]
    if args.init_from:
        try:
            return load_pretrained(args.init_from, device=device, dtype=dtype)
        except ValueError as e:
            raise UsageError(f"--init-from: {e}") from None
    torch.manual_seed(args.seed)
    return Transformer(PRESETS[args.preset], dtype=dtype, device=device).eval()


def _timed(fn: typing.Callable[[], list[list[int]]], device: torch.device) -> tuple[float, list[list[int]]]:
    """``fn()`` and its time in seconds, the slowest rank's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor([time.perf_counter() - t], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item(), out


def run(args: argparse.Namespace) -> dict[str, typing.Any]:
    for name in ("batch", "prompt_len", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    rt = init_runtime(args.device)
    try:
        model = _build(args, rt.device)
        g = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()

        def gen(use_cache: bool) -> list[list[int]]:
            return generate(model, prompts, args.new_tokens, temperature=0, use_cache=use_cache)

        gen(True)  # warm-up: first-call allocations and code paths
        rates: dict[str, list[float]] = {"cached": [], "recomputed": []}
        same = True
        for r in range(args.rounds):
            outs = {}
            for use_cache in (True, False) if r % 2 == 0 else (False, True):
                seconds, outs[use_cache] = _timed(functools.partial(gen, use_cache), rt.device)
                rates["cached" if use_cache else "recomputed"].append(args.batch * args.new_tokens / seconds)
            same = same and outs[True] == outs[False]
        ratios = [c / u for c, u in zip(rates["cached"], rates["recomputed"])]
        result = {
            "tp": rt.world,
            "device": str(rt.device),
            "model": args.init_from or args.ckpt_dir or args.preset,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "max_seq_len": model.cfg.max_seq_len,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "ratio": statistics.median(ratios),
            "rounds": {"tokens_per_s": rates, "ratio": ratios},
            "same_tokens": same,
        }
        if rt.rank == 0:
            tps = result["tokens_per_s"]
            print(
                f"{result['model']} ({result['dtype']}), tp {rt.world} on {rt.device.type}, batch {args.batch}, "
                f"prompt {args.prompt_len} + {args.new_tokens} new tokens (max_seq_len {model.cfg.max_seq_len}), "
                f"{args.rounds} rounds"
            )
            print(f"  KV cache      {tps['cached']:10.1f} tokens/s")
            print(f"  recomputed    {tps['recomputed']:10.1f} tokens/s")
            print(f"  ratio         {result['ratio']:10.2f} x (median of per-round ratios)")
            print(f"  same tokens   {same}")
            if args.out:
                args.out.write_text(json.dumps(result, indent=1) + "\n")
        return result
    finally:
        rt.shutdown()


def main(argv: list[str] | None = None) -> int:
    def command(prog: str) -> None:
        run(build_parser().parse_args(argv))

    return run_cli("bench_generate.py", command)


if __name__ == "__main__":
    sys.exit(main())
