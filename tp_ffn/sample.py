"""Generate text from a training checkpoint or a pretrained one, the model sharded over all ranks (TP).

    python -m tp_ffn.sample --ckpt-dir runs/tiny --prompt "def " --max-new-tokens 200
    python -m tp_ffn.sample --init-from /models/Llama-2-7b-hf --prompt "The capital of France is" --temperature 0
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m tp_ffn.sample --ckpt-dir runs/ft \\
        --prompt "Once upon a time" --num-samples 3 --temperature 0.7 --top-p 0.9 --seed 1

``tp-ffn-sample ...`` (the console script) and ``scripts/sample.py ...`` are the same command.

Any TP size reads any checkpoint (the one a tp 2 x dp 2 run wrote loads at tp 1 or tp 4). Text is
encoded and decoded with the tokenizer the checkpoint was trained with (its copy in the step
directory; ``--init-from``: the directory's own tokenizer), or ``--tokenizer``. The prompt starts
with BOS where the model family puts one; a sample ends at the tokenizer's EOS. Rank 0 prints each
sample: the prompt, then the continuation. ``--temperature 0`` is greedy; otherwise ``--top-k``
then ``--top-p`` narrow the choice, drawn from a generator seeded with ``--seed`` (the same samples
at every TP size). Errors: one line, exit status 2 (see :mod:`tp_ffn.train.cli`); the ranks agree
on the checkpoint and the tokenizer first, so one that some ranks cannot see (a relative
--ckpt-dir, a node without the mount) is reported, naming what each rank saw.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence

import torch

from .models.llama import Transformer
from .train.cli import ArgumentParser, run_cli
from .train.consensus import agree
from .train.data.tokenizers import resolve_tokenizer, tokenizer_from_checkpoint
from .train.errors import UsageError
from .train.run.generate import check_sampling, generate, load_checkpoint_model
from .train.run.parallelize import init_runtime

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "sample.py") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt-dir", help="a training --ckpt-dir (newest checkpoint) or one step_N directory")
    src.add_argument("--init-from", help="a Hugging Face or Meta checkpoint directory")
    p.add_argument(
        "--tokenizer",
        default="auto",
        metavar="{auto,bytes,PATH}",
        help="auto: the checkpoint's own tokenizer; PATH: a tokenizer.json, tokenizer.model or a directory holding one",
    )
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="then among the fewest whose probability reaches p (1: all)"
    )
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole context for every token (slow; for checks)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--no-verify-checkpoint",
        dest="verify_checkpoint",
        action="store_false",
        help="skip comparing the checkpoint's data files with their SHA-256 digests (no pickled code runs either way)",
    )
    return p


def _load(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, typing.Any, str]:
    """The model (this rank's TP shard), its tokenizer, and a header line; every rank found the same."""

    def same_tokenizer(find: typing.Callable[[], typing.Any]) -> typing.Any:
        return agree(find, what="the tokenizer", describe=lambda tok: f"{tok.kind}, fingerprint {tok.fingerprint}")

    if args.ckpt_dir is not None:
        model, info = load_checkpoint_model(args.ckpt_dir, device=device, verify=args.verify_checkpoint)
        if args.tokenizer == "auto":
            tok = same_tokenizer(lambda: tokenizer_from_checkpoint(info.path))
        else:
            tok = same_tokenizer(lambda: resolve_tokenizer(args.tokenizer))
        return model, tok, f"{info.path} (step {info.step})"

    def load() -> torch.nn.Module:
        try:
            return Transformer.from_pretrained(args.init_from, device=device)
        except (OSError, ValueError) as e:
            raise UsageError(f"--init-from {args.init_from}: {e}") from None

    model = agree(load, what=f"--init-from {args.init_from}")
    tok = same_tokenizer(lambda: resolve_tokenizer(args.tokenizer, init_from=args.init_from))
    return model.eval(), tok, args.init_from


def _sample(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UsageError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    try:
        check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        name, _, problem = str(e).partition(":")  # the message names the keyword: say the flag
        raise UsageError(f"--{name.replace('_', '-')}:{problem}") from None
    rt = init_runtime(args.device)
    with rt.session():
        model, tok, header = _load(args, rt.device)
        if tok.vocab_size > model.cfg.vocab_size:  # the model and tokenizer are agreed: so is this
            raise UsageError(
                f"--tokenizer: its ids go up to {tok.vocab_size - 1}, the model's embedding has "
                f"{model.cfg.vocab_size} rows",
                agreed=True,
            )
        if rt.rank == 0:
            print(
                f"# {header}, tp {rt.world}, {tok.kind} tokenizer, temperature {args.temperature}, "
                f"top-k {args.top_k}, top-p {args.top_p}",
                flush=True,
            )
        gen = torch.Generator().manual_seed(args.seed)
        prompt = tok.prompt(args.prompt)
        if not prompt:
            raise UsageError("--prompt: expected some text (this tokenizer adds no BOS)", agreed=True)
        shown = prompt[1:] if tok.add_bos and tok.bos_id is not None else prompt
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
                stop_tokens=() if tok.eos_id is None else (tok.eos_id,),
            )
            if rt.rank == 0:
                print(f"--- sample {i + 1}\n{tok.decode(shown + out)}", flush=True)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Sample with the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    ``prog`` names the command in ``--help`` and its error lines (default: the process's name)."""
    return run_cli(prog, lambda prog: _sample(build_parser(prog).parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tp_ffn.sample"))
