"""Convert Llama checkpoints between Hugging Face and Meta layouts, in one process.

    python -m tp_ffn.convert --from hf --to meta --num-shards 2 SRC DST      # HF -> consolidated.00/01.pth
    python -m tp_ffn.convert --from meta --to hf --max-seq-len 4096 SRC DST  # Meta (any shard count) -> HF
    python -m tp_ffn.convert --from meta --to meta --num-shards 8 SRC DST    # reshard a Meta checkpoint
    python -m tp_ffn.convert --from hf --to meta --force SRC DST             # replace a non-empty DST
    python -m tp_ffn.convert --from hf --to meta --meta-embedding-split dim SRC DST  # Llama 1/2's layout
    python -m tp_ffn.convert --from train --to hf runs/ft DST                # a training checkpoint -> HF
    python -m tp_ffn.convert --from train --to meta --num-shards 2 runs/ft/step_00000100 DST

``tp-ffn-convert ...`` (the console script) and ``scripts/convert_checkpoint.py ...`` are the same
command.

SRC is a Hugging Face directory (config.json + model.safetensors, or sharded safetensors with
model.safetensors.index.json), a Meta one (params.json + consolidated.XX.pth), or a training
checkpoint (a --ckpt-dir, whose newest checkpoint is read, or one step_N directory): written with
the tokenizer it was trained with (tokenizer.json / tokenizer.model and tokenizer_config.json for
Hugging Face, which transformers' from_pretrained and AutoTokenizer load). Tensors keep
their dtype and values bit for bit; only the q/k rows are permuted between the two rotary
conventions. Meta shards split tok_embeddings.weight by vocabulary, as Llama 3's code and
llama-models load it (VocabParallelEmbedding); --meta-embedding-split dim writes Llama 1/2's
layout (ParallelEmbedding, split on the embedding dimension). --num-shards must give every shard
whole attention heads (a common divisor of n_heads and n_kv_heads), as Meta's model code requires:
other counts are refused (key/value heads are not replicated). DST is written into a hidden
sibling directory and renamed into place at the end, so an interrupted run never leaves a DST
that looks complete; a non-empty DST is refused without --force. The whole model is held in
memory once. Errors: one line (``python -m tp_ffn.convert: error: ...``),
exit status 2 (see :mod:`tp_ffn.train.cli`). Loading a checkpoint straight into a tensor-parallel model needs no
conversion: see tp_ffn.models.load_pretrained.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .train.cli import ArgumentParser, run_cli
from .train.errors import UsageError

__all__ = ["ConvertArgs", "main", "parse_args"]


@dataclass(frozen=True)
class ConvertArgs:
    src: Path
    dst: Path
    source_format: str
    target_format: str
    num_shards: int = 1
    max_seq_len: int | None = None
    force: bool = False
    meta_embedding_split: str | None = None
    verify_checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"--num-shards: expected >= 1, got {self.num_shards}")
        if self.num_shards != 1 and self.target_format != "meta":
            raise ValueError(f"--num-shards: only meaningful with --to meta, got --to {self.target_format}")
        if self.max_seq_len is not None and self.source_format == "train":
            raise ValueError("--max-seq-len: not with --from train (the checkpoint records its own)")
        if self.meta_embedding_split is not None and self.target_format != "meta":
            raise ValueError(f"--meta-embedding-split: only meaningful with --to meta, got --to {self.target_format}")
        if not self.verify_checkpoint and self.source_format != "train":
            raise ValueError(f"--no-verify-checkpoint: only with --from train, got --from {self.source_format}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"--max-seq-len: expected >= 1, got {self.max_seq_len}")
        if not self.src.is_dir():
            raise ValueError(f"SRC: expected a checkpoint directory, got {self.src}")
        if self.dst.exists() and not self.force and (not self.dst.is_dir() or any(self.dst.iterdir())):
            raise ValueError(f"DST: {self.dst} exists and is not empty; pass --force to replace it")


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "convert_checkpoint.py") -> ConvertArgs:
    """Parse ``argv`` into checked :class:`ConvertArgs` (raises :class:`UsageError`)."""
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from", dest="source_format", choices=("hf", "meta", "train"), required=True, help="layout of SRC"
    )
    parser.add_argument("--to", dest="target_format", choices=("hf", "meta"), required=True, help="layout to write")
    parser.add_argument("--num-shards", type=int, default=1, help="consolidated.XX.pth files to write (--to meta)")
    parser.add_argument(
        "--max-seq-len", type=int, default=None,
        help="context length to record (Meta's params.json has none; default: SRC's, else 4096)",
    )  # fmt: skip
    parser.add_argument(
        "--meta-embedding-split", choices=("vocab", "dim"), default=None,
        help="how Meta shards split tok_embeddings.weight (--to meta): 'vocab' (default; Llama 3, llama-models) "
        "or 'dim' (Llama 1/2's ParallelEmbedding)",
    )  # fmt: skip
    parser.add_argument(
        "--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
        help="--from train: skip the SHA-256 check of the data files (every other check stays)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    parser.add_argument("src", type=Path, metavar="SRC")
    parser.add_argument("dst", type=Path, metavar="DST")
    ns = parser.parse_args(argv)
    try:
        return ConvertArgs(**vars(ns))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _convert(args: ConvertArgs) -> None:
    from tqdm import tqdm

    from .models import convert_checkpoint, detect_format

    try:
        if args.source_format == "train":
            from .train.run.export import export_checkpoint

            step = export_checkpoint(
                args.src, args.dst, to=args.target_format, num_shards=args.num_shards, overwrite=args.force,
                progress=tqdm, embedding_split=args.meta_embedding_split, verify=args.verify_checkpoint,
            )  # fmt: skip
            what = f"{step} as a {args.target_format} checkpoint"
        else:
            found = detect_format(args.src)
            if found != args.source_format:
                raise ValueError(f"--from {args.source_format}: but {args.src} holds a {found} checkpoint")
            convert_checkpoint(
                args.src, args.dst, to=args.target_format, num_shards=args.num_shards, overwrite=args.force,
                max_seq_len=args.max_seq_len, progress=tqdm, embedding_split=args.meta_embedding_split or "vocab",
            )  # fmt: skip
            what = f"{args.target_format} checkpoint"
    except (ValueError, FileExistsError) as e:  # bad input, as argparse's own errors
        raise UsageError(str(e)) from None
    shards = f" in {args.num_shards} shard(s)" if args.target_format == "meta" else ""
    print(f"wrote {what}{shards} to {args.dst}")


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Convert with the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    ``prog`` names the command in ``--help`` and its error lines (default: the process's name)."""
    return run_cli(prog, lambda prog: _convert(parse_args(argv, prog=prog)))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tp_ffn.convert"))
