"""Train a Llama-style model with tensor parallelism (TP) x data parallelism (FSDP2) under torchrun.

CPU, one machine, 2 processes (gloo), the tiny preset on the Python standard library's sources:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/train.py \
        --preset tiny --tp 2 --steps 300 --seed 0 --ckpt-dir runs/tiny --ckpt-every 100 \
        --metrics runs/tiny/metrics.jsonl

Continue it (same or other --tp / --dp: checkpoints reshard), here at tp 1 x dp 2 up to step 600,
the cosine stretched to the new end (without --lr-schedule-steps it keeps the 300-step schedule):

    torchrun --standalone --nproc_per_node 2 scripts/train.py --preset tiny --tp 1 --dp 2 \
        --steps 600 --lr-schedule-steps 600 --ckpt-dir runs/tiny --resume

Fine-tune a pretrained model on your text with its own tokenizer (tokenizer.json or
tokenizer.model beside the weights); evaluate it before and after (--eval-only):

    torchrun --standalone --nproc_per_node 2 scripts/train.py --init-from /models/tiny-llama \
        --data notes/ --tp 2 --eval-only
    torchrun --standalone --nproc_per_node 2 scripts/train.py --init-from /models/tiny-llama \
        --data notes/ --tp 2 --lr 1e-4 --steps 200 --ckpt-dir runs/notes
    torchrun --standalone --nproc_per_node 2 scripts/train.py --init-from /models/tiny-llama \
        --data notes/ --tp 2 --ckpt-dir runs/notes --resume --eval-only

Survive lost ranks: restart the whole group from the newest complete checkpoint, up to 3 times:

    torchrun --standalone --nproc_per_node 2 --max-restarts 3 scripts/train.py --tp 2 \
        --steps 1000 --ckpt-dir runs/ft --ckpt-every 50 --resume

GPUs, one node of 8 (NCCL), tp 4 x dp 2, sequence parallel, bf16, from Hugging Face weights:

    torchrun --standalone --nproc_per_node 8 scripts/train.py --init-from /models/Llama-2-7b-hf \
        --tp 4 --dp 2 --sequence-parallel --dtype bfloat16 --activation-checkpointing \
        --seq-len 2048 --batch-size 64 --micro-batch-size 4 --lr 3e-5 --data corpus.txt \
        --ckpt-dir /ckpt/run1 --ckpt-every 500 --resume

Several nodes (run on each; NODE_RANK 0..N-1, HEAD the address of node 0; checkpoints on a shared
file system):

    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc_per_node 8 \
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 --rdzv-id run1 \
        scripts/train.py --tp 8 --dp 2 --ckpt-dir /shared/ckpt/run1 --resume

Under Slurm: ``scripts/slurm/train.sbatch`` (docs/cluster.md).

Plain ``python scripts/train.py ...`` is a world of one. ``--help`` lists every flag. Bad
arguments, files or checkpoints, and ranks that see different files, end with one line
(``train.py: error: ...``) and exit status 2 before step 1; nothing already saved is overwritten.
A resumed run keeps its learning-rate schedule; ``--lr-schedule-steps N`` stretches it.

Exit status: 0 done; 1 the loss diverged; 2 bad input, or --ckpt-dir in use by another run;
3 a checkpoint or the metrics could not be written (full disk, I/O error: nothing older is lost);
75 stopped by SIGTERM or SIGUSR1 after saving the step it was in (run it again with --resume).
"""

from __future__ import annotations

import os
import sys
import time

from tp_ffn.shutdown import exit_without_teardown
from tp_ffn.train import UsageError, parse_args, train
from tp_ffn.train.consensus import QUIET_RANK_GRACE_S, report_error
from tp_ffn.train.preempt import EXIT_PREEMPTED


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    try:
        result = train(parse_args(argv))
    except UsageError as e:
        report_error("train.py", e)
        return e.exit_status
    except FloatingPointError as e:  # the loss diverged: the same on every rank (it is all-reduced)
        if _rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    if result.stopped_by is not None:
        if _rank() == 0:
            saved = f"saved {result.checkpoints[-1]}" if result.checkpoints else "no --ckpt-dir: nothing saved"
            print(
                f"train.py: stopped by {result.stopped_by} after step {result.final_step}: {saved}; exit status "
                f"{EXIT_PREEMPTED} (run it again with --resume to continue)",
                file=sys.stderr,
                flush=True,
            )
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            time.sleep(QUIET_RANK_GRACE_S)  # torchrun stops the group at the first exit: let rank 0 print first
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    status = main()
    if status == EXIT_PREEMPTED:
        # Interpreter finalization puts the default handlers back: a late SIGTERM from the scheduler
        # or torchrun would then turn exit status 75 into 143. Nothing is left to tear down.
        exit_without_teardown(status)
    sys.exit(status)
