"""The training job's arguments: one dataclass, parsed from the command line and validated here.

Everything that can be checked without the process group is checked in
``TrainConfig.__post_init__``; what needs the world size (``--tp`` x ``--dp``, the batch split) in
:meth:`TrainConfig.plan`, which returns a :class:`ParallelPlan`. Every error is a
:class:`UsageError` whose message names the flag and the numbers, so that ``scripts/train.py`` can
print it as one line on rank 0 and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.llama import PRESETS, LlamaConfig
from .cli import ArgumentParser
from .errors import UsageError  # re-exported: its home was here

__all__ = ["DTYPES", "ParallelPlan", "TrainConfig", "UsageError", "build_parser", "parse_args", "parse_model_args"]

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ParallelPlan:
    """How the world is split and how a global batch is cut into micro-batches.

    ``world = dp * tp``; a global batch of ``batch_size`` sequences is
    ``grad_accum`` micro-steps x ``dp`` ranks x ``micro_batch`` sequences.
    """

    world: int
    tp: int
    dp: int
    batch_size: int
    micro_batch: int
    grad_accum: int


@dataclass(frozen=True)
class TrainConfig:
    """Arguments of ``scripts/train.py`` (see ``--help`` for each one's meaning)."""

    preset: str = "tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tp: int = 1
    dp: int | None = None
    sequence_parallel: bool = False
    ffn_fuse_gate_up: bool = False
    ffn_overlap_comm: bool = True
    ffn_comm_chunks: int = 1
    dtype: str = "float32"
    device: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    activation_checkpointing: bool = False
    steps: int = 200
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 16
    micro_batch_size: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    lr_schedule_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    data: str | None = None
    tokenizer: str = "auto"
    token_cache: str | None = None
    eval_only: bool = False
    corpus_bytes: int = 4_000_000
    val_fraction: float = 0.05
    val_every: int = 50
    val_sequences: int = 32
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    keep_last: int = 0
    ckpt_async: bool = False
    resume: bool = False
    verify_checkpoint: bool = True
    metrics: str | None = None
    progress: bool = True
    deterministic: bool = False
    timeout: int = 600
    peak_tflops: float | None = None
    force: bool = False
    return_freed_memory: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(f"--preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in (
            "tp",
            "steps",
            "seq_len",
            "batch_size",
            "val_sequences",
            "corpus_bytes",
            "timeout",
            "ffn_comm_chunks",
        ):
            _positive(name, getattr(self, name))
        for name in ("dp", "micro_batch_size", "lr_schedule_steps"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("warmup_steps", "val_every", "ckpt_every", "keep_last", "seed"):
            if getattr(self, name) < 0:
                raise UsageError(f"{_flag(name)}: expected an int >= 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device: expected auto, cpu or cuda, got {self.device!r}")
        if not self.lr > 0:
            raise UsageError(f"--lr: expected a learning rate > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"--min-lr-ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction: expected a value in (0, 1), got {self.val_fraction}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UsageError(
                f"--grad-clip / --weight-decay: expected values >= 0, got {self.grad_clip} / {self.weight_decay}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError(f"--beta1 / --beta2: expected values in [0, 1), got {self.beta1} / {self.beta2}")
        if self.sequence_parallel and self.tp > 1 and self.ffn_comm_chunks > 1:
            raise UsageError(
                f"--ffn-comm-chunks: expected 1 with --sequence-parallel (its forward ends in a reduce-scatter, "
                f"not an all-reduce to split), got {self.ffn_comm_chunks}"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UsageError(f"--peak-tflops: expected a rate > 0 (TFLOP/s per device), got {self.peak_tflops}")
        if self.eval_only and self.init_from is None and not self.resume:
            raise UsageError("--eval-only: needs --init-from or --resume (the weights to evaluate)")
        if self.resume and self.ckpt_dir is None:
            raise UsageError("--resume: needs --ckpt-dir (the directory to resume from)")
        if self.ckpt_every and self.ckpt_dir is None:
            raise UsageError(f"--ckpt-every {self.ckpt_every}: needs --ckpt-dir (where to write the checkpoints)")
        if self.ckpt_async and self.ckpt_dir is None:
            raise UsageError("--ckpt-async: needs --ckpt-dir (where to write the checkpoints)")
        if self.metrics is not None and not self.metrics.endswith(".jsonl"):
            raise UsageError(
                f"--metrics: expected a path ending in .jsonl (the plot goes next to it as .png), got {self.metrics!r}"
            )

    @property
    def metrics_path(self) -> Path | None:
        """``--metrics``, else ``<ckpt-dir>/metrics.jsonl``, else ``None`` (no metrics file)."""
        if self.metrics is not None:
            return Path(self.metrics)
        return None if self.ckpt_dir is None else Path(self.ckpt_dir) / "metrics.jsonl"

    def model_config(self, base: LlamaConfig | None = None) -> LlamaConfig:
        """The preset (or ``base``, e.g. read from ``--init-from``) with ``--model-args`` applied."""
        cfg = PRESETS[self.preset] if base is None else base
        try:
            return cfg.updated(**self.model_args) if self.model_args else cfg
        except (TypeError, ValueError) as e:
            raise UsageError(f"--model-args: {e}") from None

    def plan(self, world: int) -> ParallelPlan:
        """Split ``world`` ranks into ``dp x tp`` and the global batch into micro-batches."""
        tp = self.tp
        if self.dp is None:
            if world % tp:
                raise UsageError(f"--tp ({tp}) must divide the world size ({world})")
            dp = world // tp
        elif tp * self.dp != world:
            raise UsageError(f"--tp ({tp}) x --dp ({self.dp}) = {tp * self.dp} must equal the world size ({world})")
        else:
            dp = self.dp
        if self.batch_size % dp:
            raise UsageError(f"--batch-size ({self.batch_size}) must be divisible by dp ({dp})")
        micro = self.micro_batch_size if self.micro_batch_size is not None else self.batch_size // dp
        if self.batch_size % (micro * dp):
            raise UsageError(
                f"--batch-size ({self.batch_size}) must be divisible by --micro-batch-size ({micro}) x dp ({dp})"
            )
        return ParallelPlan(world, tp, dp, self.batch_size, micro, self.batch_size // (micro * dp))

    def check_model(self, cfg: LlamaConfig, *, token_ids: int = 256, tokens: str = "byte-level data") -> None:
        """Raise :class:`UsageError` unless ``cfg`` can be trained with these arguments on ``tokens``
        (whose ids go up to ``token_ids - 1``: the embedding needs that many rows)."""
        if cfg.vocab_size < token_ids:
            raise UsageError(f"model: vocab_size ({cfg.vocab_size}) must be >= {token_ids} for {tokens}")
        if self.seq_len > cfg.max_seq_len:
            raise UsageError(f"--seq-len ({self.seq_len}) must be <= the model's max_seq_len ({cfg.max_seq_len})")
        try:
            cfg.check_tp(self.tp)
        except ValueError as e:
            raise UsageError(str(e).replace("tp:", "--tp:", 1)) from None
        if self.sequence_parallel and self.seq_len % self.tp:
            raise UsageError(f"--sequence-parallel: --seq-len ({self.seq_len}) must be divisible by --tp ({self.tp})")
        if cfg.moe is not None and (self.ffn_fuse_gate_up or self.ffn_comm_chunks != 1 or not self.ffn_overlap_comm):
            raise UsageError(
                "--ffn-fuse-gate-up / --ffn-comm-chunks / --no-ffn-overlap: modes of the dense feed-forward block; "
                f"this model's are mixtures of experts (n_experts={cfg.n_experts})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{_flag(name)}: expected an int >= 1, got {value!r}")


def parse_model_args(text: str) -> dict[str, Any]:
    """``"dim=96,multiple_of=1,ffn_dim_multiplier=1.3"`` -> typed fields of :class:`LlamaConfig`."""
    hints = typing.get_type_hints(LlamaConfig)
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in hints:
            raise UsageError(f"--model-args: expected KEY=VALUE with KEY one of {sorted(hints)}, got {item!r}")
        kind = hints[key]
        try:
            if value.strip().lower() == "none":
                out[key] = None
            elif kind is str:
                out[key] = value.strip()
            elif kind in (bool, bool | None):
                out[key] = {"true": True, "false": False}[value.strip().lower()]
            elif kind in (int, int | None):
                out[key] = int(value)
            else:
                out[key] = float(value)
        except ValueError:
            raise UsageError(f"--model-args: {key} expects a number, got {value!r}") from None
        except KeyError:
            raise UsageError(f"--model-args: {key} expects true or false, got {value!r}") from None
    return out


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(
        prog=prog,
        description="Train a Llama-style model with tensor x data parallelism (launch with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=d.preset, help=f"model shape: one of {sorted(PRESETS)}")
    m.add_argument(
        "--model-args", default="", metavar="K=V,...", help="override LlamaConfig fields, e.g. n_layers=4,multiple_of=1"
    )
    m.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start from a Hugging Face or Meta checkpoint directory (its config replaces --preset)",
    )
    par = p.add_argument_group("parallelism and precision")
    par.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel size (ranks that share one model replica)")
    par.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel size (FSDP2 over this many replicas); default world size / tp",
    )
    par.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="shard activations between blocks along the sequence over the TP group",
    )
    par.add_argument(
        "--ffn-fuse-gate-up",
        action="store_true",
        help="the FFN computes w1 and w3 as one GEMM (same checkpoint layout; see docs/benchmarks.md for when it pays)",
    )
    par.add_argument(
        "--no-ffn-overlap",
        dest="ffn_overlap_comm",
        action="store_false",
        help="the FFN waits for its input-gradient all-reduce before the weight-gradient GEMMs (without --ffn-fuse-gate-up: the reference path of tp_ffn/comm.py)",
    )
    par.add_argument(
        "--ffn-comm-chunks",
        type=int,
        default=d.ffn_comm_chunks,
        metavar="K",
        help="the FFN's forward all-reduce in K token chunks, each overlapping the next chunk's GEMM (not with --sequence-parallel)",
    )
    par.add_argument(
        "--dtype",
        default=d.dtype,
        choices=DTYPES,
        help="bfloat16: bf16 compute and parameters in the forward, fp32 master weights and gradient reduction",
    )
    par.add_argument(
        "--device",
        default=d.device,
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda (NCCL) when available, else cpu (gloo)",
    )
    par.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    par.add_argument(
        "--compile-backend",
        default=d.compile_backend,
        help="torch.compile backend (inductor; aot_eager compiles fast, without code generation)",
    )
    par.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block's activations in backward"
    )
    par.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (GPU runs)")
    par.add_argument(
        "--timeout",
        type=int,
        default=d.timeout,
        help="seconds a rank may wait in the rendezvous or a collective before failing (torchrun --max-restarts then restarts the group)",
    )
    par.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of one device in the compute dtype, for MFU (default: a GEMM probe at start-up)",
    )
    par.add_argument(
        "--force", action="store_true", help="start even when the memory plan says the run does not fit"
    )
    par.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="CPU: glibc hands every block of 128 KiB or more back to the system when freed, so the resident "
        "set follows the tensors the memory plan counts; 1.55x slower steps on a 2-core CPU (small preset); "
        "MALLOC_MMAP_THRESHOLD_ in the environment, when set, wins",
    )
    t = p.add_argument_group("optimisation")
    t.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps in total (a resumed run stops at the same step)"
    )
    t.add_argument("--seed", type=int, default=d.seed, help="seeds the weights and the data order")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    t.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch: sequences per optimizer step, over all dp ranks",
    )
    t.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="sequences per rank per forward; gradient accumulation = batch / (micro x dp); default batch / dp",
    )
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    t.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr x this")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    t.add_argument(
        "--lr-schedule-steps",
        type=int,
        default=None,
        metavar="N",
        help="length of the warmup + cosine schedule (later steps stay at its floor); default --steps, and for "
        "--resume the resumed run's own (recorded in meta.json), so a larger --steps keeps it: pass N to stretch it",
    )
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of matrices (not norms)")
    t.add_argument("--beta1", type=float, default=d.beta1)
    t.add_argument("--beta2", type=float, default=d.beta2)
    t.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="clip the global gradient norm to this (0: off)"
    )
    dat = p.add_argument_group("data")
    dat.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a UTF-8 text file, a .jsonl file with a 'text' field per line, or a directory or glob of them; "
        "default: the Python standard library's sources",
    )
    dat.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        metavar="{auto,bytes,PATH}",
        help="auto: the --init-from checkpoint's own tokenizer (tokenizer.json or tokenizer.model), else bytes; "
        "PATH: a tokenizer.json, a tokenizer.model, a directory holding one, or a training checkpoint",
    )
    dat.add_argument(
        "--token-cache",
        default=None,
        metavar="DIR",
        help="where tokenized data is cached (every rank must see it); default $TP_FFN_CACHE/tokens or ~/.cache/tp_ffn/tokens",
    )
    dat.add_argument("--corpus-bytes", type=int, default=d.corpus_bytes, help="size of the default corpus")
    dat.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="tail of the data held out for validation"
    )
    dat.add_argument(
        "--val-every",
        type=int,
        default=d.val_every,
        help="validation loss every N steps (and at the end; 0: only at the end)",
    )
    dat.add_argument("--val-sequences", type=int, default=d.val_sequences, help="sequences in each validation pass")
    c = p.add_argument_group("checkpoints and metrics")
    c.add_argument(
        "--ckpt-dir", default=None, metavar="DIR", help="checkpoint directory (step_XXXXXXXX/ subdirectories)"
    )
    c.add_argument(
        "--ckpt-every", type=int, default=d.ckpt_every, help="save every N steps (0: only at the end); needs --ckpt-dir"
    )
    c.add_argument(
        "--keep-last",
        type=int,
        default=d.keep_last,
        help="keep only the newest N checkpoints (0: keep all); older ones are deleted once a newer one is complete",
    )
    c.add_argument(
        "--ckpt-async",
        action="store_true",
        help="a save copies the state to CPU memory and writes it in the background (DCP async_save; one at a "
        "time): training waits for the copy only; costs a CPU copy of each rank's share (docs/cluster.md)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --ckpt-dir, if any (any --tp / --dp)",
    )
    c.add_argument(
        "--no-verify-checkpoint",
        dest="verify_checkpoint",
        action="store_false",
        help="on --resume, skip comparing the data files with their SHA-256 digests in meta.json (reads the whole "
        "checkpoint once); sizes, the index and the model config are still checked, and no pickled code ever runs",
    )
    c.add_argument(
        "--metrics",
        default=None,
        metavar="FILE.jsonl",
        help="metrics file (default <ckpt-dir>/metrics.jsonl); the loss plot is written next to it as .png",
    )
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on rank 0")
    c.add_argument(
        "--eval-only",
        action="store_true",
        help="with --init-from or --resume: print the validation loss of those weights on --data and append it to the "
        "metrics file; no training, no checkpoint",
    )
    return p


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "train.py") -> TrainConfig:
    """Parse ``argv`` into a validated :class:`TrainConfig` (raises :class:`UsageError`)."""
    ns = vars(build_parser(prog).parse_args(argv))
    ns["model_args"] = parse_model_args(ns["model_args"])
    return TrainConfig(**ns)
