"""Generate text from a training checkpoint, the model sharded over all ranks (tensor parallel).

    python scripts/sample.py --ckpt-dir runs/tiny --prompt "def " --max-new-tokens 200
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/sample.py --ckpt-dir runs/tiny \
        --prompt "import " --num-samples 3 --temperature 0.7

Any TP size reads any checkpoint (the one a tp 2 x dp 2 run wrote loads at tp 1 or tp 4) whose
heads it divides. Rank 0 prints each sample: the prompt, then the continuation. Errors: one line,
exit status 2; the ranks agree on the checkpoint first, so one that some ranks cannot see (a
relative --ckpt-dir, a node without the mount) is reported, naming what each rank saw.
"""

from __future__ import annotations

import argparse
import sys
import typing

import torch

from tp_ffn.train import UsageError
from tp_ffn.train.consensus import report_error
from tp_ffn.train.generate import check_sampling, generate, load_checkpoint_model
from tp_ffn.train.parallelize import init_runtime


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sample.py", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--ckpt-dir", required=True, help="a training --ckpt-dir (newest checkpoint) or one step_N directory"
    )
    p.add_argument("--prompt", default="def ", help="text to continue (UTF-8 bytes are the tokens)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate per sample")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest bytes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest bytes up to this mass (1: all)")
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole context for every token (slow; for checks)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.max_new_tokens < 0 or args.num_samples < 1:
            raise UsageError("--max-new-tokens must be >= 0 and --num-samples >= 1")
        prompt = list(args.prompt.encode("utf-8"))
        if not prompt:
            raise UsageError("--prompt: expected at least one byte")
        try:
            check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        except ValueError as e:
            name, _, problem = str(e).partition(":")  # the message names the keyword: say the flag
            raise UsageError(f"--{name.replace('_', '-')}:{problem}") from None
        rt = init_runtime(args.device)
        ok = False
        try:
            model, info = load_checkpoint_model(args.ckpt_dir, device=rt.device)
            if rt.rank == 0:
                print(f"# {info.path} (step {info.step}), tp {rt.world}, temperature {args.temperature}", flush=True)
            gen = torch.Generator().manual_seed(args.seed)
            for i in range(args.num_samples):
                out = generate(
                    model,
                    prompt,
                    args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k or None,
                    top_p=args.top_p,
                    generator=gen,
                    use_cache=not args.no_kv_cache,
                )
                if rt.rank == 0:
                    print(f"--- sample {i + 1}\n{bytes(prompt + out).decode('utf-8', errors='replace')}", flush=True)
            ok = True
        except UsageError as e:
            if not e.agreed and rt.world > 1:
                e.rank = rt.rank  # seen by this rank alone: it reports it
            raise
        finally:
            rt.shutdown(synchronize=ok)
    except UsageError as e:
        report_error("sample.py", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
