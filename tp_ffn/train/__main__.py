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

Under Slurm: ``scripts/slurm/train.sbatch`` (docs/cluster.md).

Plain ``python -m tp_ffn.train ...`` is a world of one; ``tp-ffn-train ...`` (the console script)
and ``scripts/train.py ...`` are the same command. ``--help`` lists every flag. Bad arguments,
files or checkpoints, and ranks that see different files, end with one line
(``python -m tp_ffn.train: error: ...``) and exit status 2 before step 1; nothing already saved is
overwritten. A resumed run keeps its learning-rate schedule; ``--lr-schedule-steps N`` stretches it.

Exit status (:mod:`tp_ffn.train.cli`): 0 done; 1 the loss diverged; 2 bad input, or --ckpt-dir in
use by another run; 3 a checkpoint or the metrics could not be written (full disk, I/O error:
nothing older is lost); 75 stopped by SIGTERM or SIGUSR1 after saving the step it was in (run it
again with --resume). Every way of starting the command (``python -m``, ``torchrun -m``,
``tp-ffn-train``, ``scripts/train.py``) exits through :func:`exit_with`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from ..shutdown import exit_without_teardown
from .cli import process_rank, run_cli
from .config import parse_args
from .consensus import QUIET_RANK_GRACE_S
from .run.preempt import EXIT_PREEMPTED
from .run.trainer import TrainResult, train

__all__ = ["console", "exit_with", "main"]


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Train with the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    ``prog`` names the command in ``--help`` and its error lines (default: the process's name)."""

    def command(prog: str) -> int:
        result = train(parse_args(argv, prog=prog))
        if result.stopped_by is None:
            return 0
        _report_stop(prog, result)
        return EXIT_PREEMPTED

    return run_cli(prog, command)


def _report_stop(prog: str, result: TrainResult) -> None:
    """One line from rank 0: which signal stopped the run, after which step, what was saved."""
    if process_rank() == 0:
        saved = f"saved {result.checkpoints[-1]}" if result.checkpoints else "no --ckpt-dir: nothing saved"
        print(
            f"{prog}: stopped by {result.stopped_by} after step {result.final_step}: {saved}; exit status "
            f"{EXIT_PREEMPTED} (run it again with --resume to continue)",
            file=sys.stderr,
            flush=True,
        )
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(QUIET_RANK_GRACE_S)  # torchrun stops the group at the first exit: let rank 0 print first


def exit_with(status: int) -> NoReturn:
    """End the process with ``status``, the way every entry point of this command ends.

    After a stop by signal (:data:`EXIT_PREEMPTED`), without the interpreter's teardown: finalization
    puts the default handlers back, so a late SIGTERM from the scheduler or torchrun would turn exit
    status 75 into 143. Nothing is left to tear down then (the run saved and closed its group).
    """
    if status == EXIT_PREEMPTED:
        exit_without_teardown(status)
    sys.exit(status)


def console() -> NoReturn:
    """The console script ``tp-ffn-train`` (pyproject.toml)."""
    exit_with(main())


if __name__ == "__main__":
    exit_with(main(prog="python -m tp_ffn.train"))
