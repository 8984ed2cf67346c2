"""Train a Llama-style model with tensor parallelism (TP) x data parallelism (FSDP2) under torchrun.

CPU, one machine, 2 processes (gloo), the tiny preset on the Python standard library's sources:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m tp_ffn.train \
        --preset tiny --tp 2 --steps 300 --seed 0 --ckpt-dir runs/tiny --ckpt-every 100 \
        --metrics runs/tiny/metrics.jsonl

Continue it (same or other --tp / --dp: checkpoints reshard), here at tp 1 x dp 2 up to step 600,
the cosine stretched to the new end (without --lr-schedule-steps it keeps the 300-step schedule):

    torchrun --standalone --nproc_per_node 2 -m tp_ffn.train --preset tiny --tp 1 --dp 2 \
        --steps 600 --lr-schedule-steps 600 --ckpt-dir runs/tiny --resume

Fine-tune a pretrained model on your text with its own tokenizer (tokenizer.json or
tokenizer.model beside the weights); evaluate it before and after (--eval-only):

    torchrun --standalone --nproc_per_node 2 -m tp_ffn.train --init-from /models/tiny-llama \
        --data notes/ --tp 2 --eval-only
    torchrun --standalone --nproc_per_node 2 -m tp_ffn.train --init-from /models/tiny-llama \
        --data notes/ --tp 2 --lr 1e-4 --steps 200 --ckpt-dir runs/notes
    torchrun --standalone --nproc_per_node 2 -m tp_ffn.train --init-from /models/tiny-llama \
        --data notes/ --tp 2 --ckpt-dir runs/notes --resume --eval-only

Survive lost ranks: restart the whole group from the newest complete checkpoint, up to 3 times:

    torchrun --standalone --nproc_per_node 2 --max-restarts 3 -m tp_ffn.train --tp 2 \
        --steps 1000 --ckpt-dir runs/ft --ckpt-every 50 --resume

GPUs, one node of 8 (NCCL), tp 4 x dp 2, sequence parallel, bf16, from Hugging Face weights:

    torchrun --standalone --nproc_per_node 8 -m tp_ffn.train --init-from /models/Llama-2-7b-hf \
        --tp 4 --dp 2 --sequence-parallel --dtype bfloat16 --activation-checkpointing \
        --seq-len 2048 --batch-size 64 --micro-batch-size 4 --lr 3e-5 --data corpus.txt \
        --ckpt-dir /ckpt/run1 --ckpt-every 500 --resume

Several nodes (run on each; NODE_RANK 0..N-1, HEAD the address of node 0; checkpoints on a shared
file system):

    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc_per_node 8 \
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 --rdzv-id run1 \
        -m tp_ffn.train --tp 8 --dp 2 --ckpt-dir /shared/ckpt/run1 --resume

Plain ``python -m tp_ffn.train ...`` is a world of one; ``tp-ffn-train ...`` (the console script)
and ``scripts/train.py ...`` are the same command. ``--help`` lists every flag. Bad arguments,
files or checkpoints, and ranks that see different files, end with one line
(``python -m tp_ffn.train: error: ...``) and exit status 2 before step 1 (every status:
:mod:`tp_ffn.train.cli`); nothing already saved is overwritten. A resumed run keeps its
learning-rate schedule; ``--lr-schedule-steps N`` stretches it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import run_cli
from .config import parse_args
from .run.trainer import train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Train with the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    ``prog`` names the command in ``--help`` and its error lines (default: the process's name)."""

    def command(prog: str) -> None:
        train(parse_args(argv, prog=prog))

    return run_cli(prog, command)


if __name__ == "__main__":
    sys.exit(main(prog="python -m tp_ffn.train"))
