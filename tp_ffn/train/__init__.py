"""The training job behind ``scripts/train.py``: config, data, parallelism, optimiser, checkpoints, metrics.

One responsibility per module, dependencies pointing one way (trainer -> the rest)::

    config.py       TrainConfig (the command line, validated in one place), ParallelPlan, UsageError
    consensus.py    decisions taken from what each rank sees, agreed by every rank; reporting errors once
    outputs.py      before step 1: the output paths can be written, and --ckpt-dir is shared by every rank
    documents.py    what --data names: text files, .jsonl lines, directories, globs; their fingerprint
    tokenizer_base.py     the Tokenizer interface and the tokenizer file names (below both modules that follow)
    tokenizer.py    bytes, --tokenizer resolution, a checkpoint's own tokenizer (re-exports Tokenizer)
    tokenizer_formats.py  tokenizer.json, Meta Llama 3 (tiktoken) and Llama 2 (SentencePiece) tokenizer.model
    tokenizer_export.py   a run's tokenizer written as Hugging Face / Meta files
    token_cache.py  the checked, memory-mapped token file (one rank builds it, the others wait)
    data.py         the corpus as bytes or tokens, train/validation split, the resumable training stream
    layout.py       where each rank's block of every parameter sits in the full model (the layers' ShardSpecs + FSDP2)
    parallelize.py  process group, ("dp", "tp") mesh, activation checkpointing, compile, FSDP2
    optim.py        AdamW, warmup + cosine, clipping by the true global gradient norm
    checkpoint.py   atomic DCP checkpoints that reshard over TP and dp, verified before every read
    saving.py       writing them: free-space check, failed writes agreed and cleaned up, --ckpt-async
    run_lock.py     one run per --ckpt-dir: flock held by rank 0, a lease file where locks do not work
    preempt.py      SIGTERM / SIGUSR1 recorded; the loop stops every rank after the same step, saved
    safe_dcp.py     DCP's reader without pickled code: restricted index unpickler, tensor-only records
    digests.py      SHA-256 of checkpoint files, streamed
    metrics.py      JSONL metrics, progress bar, loss plot
    flops.py        model FLOPs per token, MFU and the peak it is held against
    memory.py       the memory plan: per-rank estimate, budget, refusal and what would fit
    memory_use.py   measuring memory: saved activations, a run's peak, the CPU allocator setting
    generate.py     sampling from a checkpoint (scripts/sample.py)
    export.py       a training checkpoint as a Hugging Face / Meta directory (convert_checkpoint.py --from train)
    trainer.py      the loop, --eval-only
"""

from .config import ParallelPlan, TrainConfig, UsageError, build_parser, parse_args
from .run.trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "UsageError", "build_parser", "parse_args", "train"]
