"""The training job: ``python -m tp_ffn.train`` (``tp-ffn-train``, ``scripts/train.py``) and what it is built of.

Four subpackages, one subject each, and the few modules every one of them reads. Imports point
one way, between modules and between these packages: ``__main__`` -> ``run`` -> ``data`` ->
``checkpoint``; ``run`` -> ``budget``; all -> the modules here -> ``tp_ffn.models`` and the core::

    __main__.py     the command line: python -m tp_ffn.train / tp-ffn-train
    cli.py          what the three commands share: argparse errors as UsageError, exit statuses, which rank prints
    errors.py       UsageError: bad input, reported as one line
    config.py       TrainConfig (the command line, validated in one place), ParallelPlan
    consensus.py    decisions taken from what each rank sees, agreed by every rank; reporting errors once

    run/            the run itself, and what is done with its checkpoints
      trainer.py      the loop, --eval-only
      parallelize.py  process group, ("dp", "tp") mesh, activation checkpointing, compile, FSDP2
      preempt.py      SIGTERM / SIGUSR1 recorded; the loop stops every rank after the same step, saved
      optim.py        AdamW, warmup + cosine, clipping by the true global gradient norm
      metrics.py      JSONL metrics, progress bar, loss plot
      outputs.py      before step 1: the output paths can be written, and --ckpt-dir is shared by every rank
      generate.py     sampling from a checkpoint (python -m tp_ffn.sample)
      export.py       a training checkpoint as a Hugging Face / Meta directory (python -m tp_ffn.convert --from train)
    checkpoint/     training checkpoints
      store.py        atomic DCP checkpoints that reshard over TP and dp, verified before every read
      saving.py       writing them: free-space check, failed writes agreed and cleaned up, --ckpt-async
      run_lock.py     one run per --ckpt-dir: flock held by rank 0, a lease file where locks do not work
      safe_dcp.py     DCP's reader without pickled code: restricted index unpickler, tensor-only records
      digests.py      SHA-256 of checkpoint files, streamed
      layout.py       where each rank's block of every parameter sits in the full model (the layers' ShardSpecs + FSDP2)
    data/           what the model is trained on
      documents.py    what --data names: text files, .jsonl lines, directories, globs; their fingerprint
      corpus.py       the corpus as bytes or tokens, train/validation split, the resumable training stream
      token_cache.py  the checked, memory-mapped token file (one rank builds it, the others wait)
      tokenizers/     one class per tokenizer format, and which one --tokenizer or a checkpoint names
    budget/         memory and FLOPs
      memory.py       the memory plan: per-rank estimate, budget, refusal and what would fit
      memory_use.py   measuring memory: saved activations, a run's peak, the CPU allocator setting
      flops.py        model FLOPs per token, MFU and the peak it is held against
"""

from .config import ParallelPlan, TrainConfig, build_parser, parse_args
from .errors import UsageError
from .run.trainer import TrainResult, train

__all__ = ["ParallelPlan", "TrainConfig", "TrainResult", "UsageError", "build_parser", "parse_args", "train"]
