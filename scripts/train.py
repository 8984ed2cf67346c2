"""Train a Llama-style model with tensor parallelism (TP) x data parallelism (FSDP2) under torchrun.

The same command as ``python -m tp_ffn.train`` and ``tp-ffn-train`` (kept at this path: docs and
launch scripts name it). Every command, from one CPU process to several GPU nodes, is in
``tp_ffn/train/__main__.py``; ``--help`` lists every flag. E.g.:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/train.py \
        --preset tiny --tp 2 --steps 300 --seed 0 --ckpt-dir runs/tiny --ckpt-every 100 \
        --metrics runs/tiny/metrics.jsonl

Errors: one line (``train.py: error: ...``), exit status 2. Exit status 3: a checkpoint or the metrics
could not be written; 75: stopped by SIGTERM or SIGUSR1 after saving (every status: ``tp_ffn/train/cli.py``).
"""

from __future__ import annotations

from tp_ffn.train.__main__ import exit_with
from tp_ffn.train.__main__ import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="train.py")


if __name__ == "__main__":
    exit_with(main())
