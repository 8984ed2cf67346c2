"""The training job behind ``scripts/train.py``: config, data, parallelism, optimiser, checkpoints, metrics.

One responsibility per module, dependencies pointing one way (trainer -> the rest)::

    config.py       TrainConfig (the command line, validated in one place), ParallelPlan, UsageError
    consensus.py    decisions taken from what each rank sees, agreed by every rank; reporting errors once
    outputs.py      before step 1: the output paths can be written, and --ckpt-dir is shared by every rank
    data.py         byte-level corpus (stdlib sources or --data), the resumable training stream
    layout.py       where each rank's block of every parameter sits in the full model
    parallelize.py  process group, ("dp", "tp") mesh, activation checkpointing, compile, FSDP2
    optim.py        AdamW, warmup + cosine, clipping by the true global gradient norm
    checkpoint.py   atomic DCP checkpoints that reshard over TP and dp
    metrics.py      JSONL metrics, progress bar, loss plot
    generate.py     sampling from a checkpoint (scripts/sample.py)
    trainer.py      the loop
"""

from .config import ParallelPlan, TrainConfig, UsageError, build_parser, parse_args
from .trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "UsageError", "build_parser", "parse_args", "train"]
