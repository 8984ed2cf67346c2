"""The training job behind ``scripts/train.py``: config, data, parallelism, optimiser, checkpoints, metrics.

One responsibility per module, dependencies pointing one way (trainer -> the rest)::

    config.py       TrainConfig (the command line, validated in one place), ParallelPlan, UsageError
    data.py         byte-level corpus (stdlib sources or --data), the resumable training stream
    layout.py       where each rank's block of every parameter sits in the full model
    parallelize.py  process group, ("dp", "tp") mesh, activation checkpointing, compile, FSDP2
    optim.py        AdamW, warmup + cosine, clipping by the true global gradient norm
    checkpoint.py   atomic DCP checkpoints that reshard over TP and dp, verified before every read
    safe_dcp.py     DCP's reader without pickled code: restricted index unpickler, tensor-only records
    digests.py      SHA-256 of checkpoint files, streamed
    metrics.py      JSONL metrics, progress bar, loss plot
    generate.py     sampling from a checkpoint (scripts/sample.py)
    trainer.py      the loop
"""

from .config import ParallelPlan, TrainConfig, UsageError, build_parser, parse_args
from .trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "UsageError", "build_parser", "parse_args", "train"]
