"""The training loop: build, (re)load, step, validate, log, checkpoint.

:func:`train` runs on every rank of the current process group (it creates one from torchrun's
environment when none exists) and returns the same :class:`TrainResult` on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from ...models.llama import LlamaConfig, Transformer
from ...sharding import shard_bounds, shard_sizes
from ..budget.flops import measure_peak, mfu, model_flops_per_token
from ..budget.memory import memory_report, plan_memory
from ..budget.memory_use import peak_bytes, release_freed_memory, reset_peak
from ..checkpoint import store as ckpt
from ..checkpoint.layout import param_blocks
from ..checkpoint.run_lock import RunLock, acquire_run_lock
from ..checkpoint.saving import SaveError, Saver, checkpoint_bytes
from ..config import ParallelPlan, TrainConfig
from ..consensus import agree, any_rank, decided_by_rank_0
from ..data.corpus import Corpus, Windows, load_corpus, validation_batch, validation_count
from ..data.token_cache import CacheOptions, default_cache_dir
from ..data.tokenizers import ByteTokenizer, Tokenizer, resolve_tokenizer, tokenizer_from_checkpoint
from ..errors import UsageError
from .metrics import MetricsLog, Progress, plot_metrics
from .optim import WarmupCosine, build_optimizer, build_scheduler, clip_grad_norm_, init_adamw_state
from .outputs import check_outputs
from .parallelize import Runtime, build_mesh, init_runtime, parallelize
from .preempt import StopSignals

__all__ = ["TrainResult", "lr_schedule_steps", "train"]


@dataclass
class TrainResult:
    """What a run did: per-step train losses (index 0 = step ``start_step + 1``), validation losses
    (mean cross-entropy per token; ``--eval-only`` gives one, at ``start_step``). ``stopped_by``: the
    signal (``"SIGTERM"``, ``"SIGUSR1"``) that ended the run early, after a checkpoint of
    ``final_step`` (``checkpoints[-1]``; none without ``--ckpt-dir``). ``aux_losses``: an MoE model's
    per-step load-balancing loss (unweighted; the step minimises ``loss + router_aux_loss_coef * aux``)."""

    start_step: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    final_step: int = 0
    resumed_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    plot: str | None = None
    stopped_by: str | None = None
    aux_losses: list[float] = field(default_factory=list)


def _model_config(cfg: TrainConfig) -> LlamaConfig:
    if cfg.init_from is None:
        return cfg.model_config()
    from ...models.weights import config_from_pretrained

    try:
        base = config_from_pretrained(cfg.init_from)
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-from {cfg.init_from}: {e}") from None
    return cfg.model_config(base)


def _pretrained_run(cfg: TrainConfig) -> tuple[LlamaConfig, Path] | None:
    """For ``--resume`` without ``--init-from``: the model config and newest checkpoint of a run that
    started from pretrained weights (its meta.json records ``--init-from``), so that the run resumes
    or is evaluated (``--eval-only``) without naming the pretrained model again. None otherwise, or
    where the checkpoint cannot be read (the discovery below then says why)."""
    if not cfg.resume or cfg.init_from is not None or cfg.ckpt_dir is None or not Path(cfg.ckpt_dir).is_dir():
        return None
    try:
        info, _ = ckpt.find_latest(cfg.ckpt_dir)
    except UsageError:
        return None
    if info is None or not isinstance(info.meta.get("args"), dict) or not info.meta["args"].get("init_from"):
        return None
    try:
        return cfg.model_config(LlamaConfig(**info.meta["model"])), info.path
    except (KeyError, TypeError, ValueError):
        return None


def _config_diff(saved: dict[str, Any], current: LlamaConfig) -> list[str]:
    now = dataclasses.asdict(current)
    return [
        f"{k} {saved.get(k)!r} vs {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    ]


def _check_resumable(
    info: ckpt.CheckpointInfo, mcfg: LlamaConfig, cfg: TrainConfig, corpus: Corpus, tokenizer: Tokenizer
) -> None:
    diff = _config_diff(info.meta.get("model", {}), mcfg)
    if diff:
        raise UsageError(
            f"checkpoint {info.path} is for another model ({'; '.join(diff)}); use the same --preset / --model-args"
        )
    saved_tok = info.meta.get("tokenizer") or {"kind": "bytes", "fingerprint": ByteTokenizer().fingerprint}
    if saved_tok.get("fingerprint") != tokenizer.fingerprint:
        raise UsageError(
            f"checkpoint {info.path} was trained with another tokenizer ({saved_tok.get('kind')}, fingerprint "
            f"{saved_tok.get('fingerprint')}); this run uses {tokenizer.kind}, fingerprint {tokenizer.fingerprint} "
            f"(--tokenizer {info.path} reads the checkpoint's own copy)"
        )
    if cfg.eval_only:  # evaluating the weights: any --data, any --seq-len
        return
    if info.meta.get("seq_len") != cfg.seq_len:
        raise UsageError(
            f"checkpoint {info.path} was trained with --seq-len {info.meta.get('seq_len')}, not {cfg.seq_len}"
        )
    data = info.meta.get("data", {})
    if data.get("fingerprint") != corpus.fingerprint:
        raise UsageError(
            f"checkpoint {info.path} was trained on other data ({data.get('source')}, sha256 {data.get('fingerprint')}); "
            f"this run reads {corpus.source}, sha256 {corpus.fingerprint}"
        )


def lr_schedule_steps(cfg: TrainConfig, resumed: dict[str, Any] | None) -> tuple[int, str | None]:
    """The length of the warmup + cosine schedule, and a note when a resumed run outlives it.

    ``--lr-schedule-steps`` if given; for a fresh run ``--steps``; for a run resumed from a checkpoint
    with meta.json ``resumed``, the schedule that run had (older checkpoints did not record it: their
    ``--steps``), so that ``--steps`` can grow without the lr jumping back up from the cosine floor.
    """
    if cfg.lr_schedule_steps is not None:
        return cfg.lr_schedule_steps, None
    saved = None if resumed is None else resumed.get("lr_schedule_steps", resumed.get("args", {}).get("steps"))
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        return cfg.steps, None
    if cfg.steps <= saved:
        return saved, None
    return saved, (
        f"lr schedule: keeping the checkpoint's {saved}-step schedule, so steps {saved + 1}-{cfg.steps} run at its "
        f"floor ({cfg.lr * cfg.min_lr_ratio:.2g}); pass --lr-schedule-steps {cfg.steps} to stretch the cosine to the new end"
    )


class _Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        rt: Runtime,
        plan: ParallelPlan,
        mcfg: LlamaConfig,
        corpus: Corpus,
        tokenizer: Tokenizer,
        schedule_steps: int,
        mesh: DeviceMesh,
    ) -> None:
        self.cfg, self.rt, self.plan, self.mcfg, self.corpus, self.mesh = cfg, rt, plan, mcfg, corpus, mesh
        self.tokenizer, self.schedule_steps = tokenizer, schedule_steps
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.tp_rank = self.mesh["tp"].get_local_rank()
        self.dp_group = self.mesh["dp"].get_group()
        self.is_main = rt.rank == 0
        self.windows = Windows(corpus.train, cfg.seq_len, cfg.seed)
        self.n_val = validation_count(corpus.val, cfg.seq_len, cfg.val_sequences)

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def build(self, init_from: str | None) -> None:
        cfg, rt = self.cfg, self.rt
        torch.manual_seed(cfg.seed)
        model = Transformer(
            self.mcfg, group=self.mesh["tp"], sequence_parallel=cfg.sequence_parallel, device=rt.device,
            fuse_gate_up=cfg.ffn_fuse_gate_up, overlap_comm=cfg.ffn_overlap_comm, comm_chunks=cfg.ffn_comm_chunks,
        )  # fmt: skip
        if init_from is not None:
            from ...models.weights import load_weights

            agree(lambda: _load_pretrained(load_weights, model, init_from), what=f"--init-from {init_from}")
            self.log(f"initialised from {init_from}")
        self.model = parallelize(
            model, self.mesh, dtype=cfg.dtype, compile=cfg.compile, compile_backend=cfg.compile_backend,
            activation_checkpointing=cfg.activation_checkpointing,
        )  # fmt: skip
        self.blocks = param_blocks(self.model)
        if cfg.eval_only:  # no optimizer state: evaluation needs the weights only
            self.state = ckpt.TrainingState(self.model)
            return
        self.opt = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        init_adamw_state(self.opt)
        self.sched = build_scheduler(self.opt, WarmupCosine(cfg.warmup_steps, self.schedule_steps, cfg.min_lr_ratio))
        self.state = ckpt.TrainingState(self.model, self.opt, self.sched)

    def loss(self, tokens: Tensor, reduction: str = "mean") -> Tensor:
        return self.loss_and_aux(tokens, reduction)[0]

    def loss_and_aux(self, tokens: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor | None]:
        """The cross-entropy and, for an MoE model, its load-balancing loss (else ``None``)."""
        tokens = tokens.to(self.rt.device, non_blocking=True)
        aux = None
        if self.mcfg.moe is None:
            logits = self.model(tokens[:, :-1])
        else:
            logits, aux = self.model(tokens[:, :-1], return_aux_loss=True)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction=reduction), aux

    def train_step(self, position: int) -> tuple[float, float]:
        plan = self.plan
        self.model.train()
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)  # cross-entropy, aux loss
        for a in range(plan.grad_accum):
            first = position + (a * plan.dp + self.dp_rank) * plan.micro_batch
            self.model.set_requires_gradient_sync(a == plan.grad_accum - 1)
            loss, aux = self.loss_and_aux(self.windows.batch(first, plan.micro_batch))
            objective = loss if aux is None else loss + self.mcfg.router_aux_loss_coef * aux
            (objective / plan.grad_accum).backward()
            total[0] += loss.detach().double()
            if aux is not None:
                total[1] += aux.detach().double()
        norm = clip_grad_norm_(self.model, self.cfg.grad_clip, tp_rank=self.tp_rank, blocks=self.blocks)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        dist.all_reduce(total, group=self.dp_group)
        loss, self.aux_loss = (total / (plan.grad_accum * plan.dp)).tolist()
        return loss, norm.item()

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss per token over the first ``n_val`` validation sequences, split over dp.

        Every dp rank runs the same number of forwards (FSDP2 gathers parameters collectively);
        a rank with fewer sequences repeats one and ignores its loss.
        """
        self.model.eval()
        sizes = shard_sizes(self.n_val, self.plan.dp)
        first, end = shard_bounds(self.n_val, self.plan.dp, self.dp_rank)
        mine = end - first
        mb = self.plan.micro_batch
        sums = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for i in range(math.ceil(max(sizes) / mb)):
            n = min(mb, mine - i * mb)
            batch = validation_batch(self.corpus.val, self.cfg.seq_len, first + i * mb if n > 0 else 0, max(n, 1))
            loss = self.loss(batch, reduction="sum")
            if n > 0:
                sums += torch.stack(
                    [loss.double(), torch.tensor(n * self.cfg.seq_len, dtype=torch.float64, device=self.rt.device)]
                )
        dist.all_reduce(sums, group=self.dp_group)
        return (sums[0] / sums[1]).item()

    def meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": dataclasses.asdict(self.mcfg), "tp": self.plan.tp, "dp": self.plan.dp, "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size, "data": {"source": self.corpus.source, "fingerprint": self.corpus.fingerprint},
            "tokenizer": self.tokenizer.record(), "torch": torch.__version__, "args": cfg.to_dict(),
            "lr_schedule_steps": self.schedule_steps,
        }  # fmt: skip


def _metrics_failed(path: Path | None, error: OSError | None, step: int, newest: str) -> None:
    why = f"{error.strerror or error}" if error is not None else "unknown error"
    raise SaveError(
        f"--metrics {path}: cannot write it ({why}); training stopped after step {step}; newest checkpoint: "
        f"{newest}; free space or fix the mount, then --resume"
    )


def _load_pretrained(load: Callable[..., None], model: nn.Module, path: str) -> None:
    try:
        load(model, path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-from {path}: {e}") from None


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job described by ``cfg`` on every rank; see :mod:`tp_ffn.train.__main__` for the commands."""
    rt = init_runtime(cfg.device, timeout_s=cfg.timeout)
    with rt.session():
        return _train(cfg, rt)


def _ffn_shape(mcfg: LlamaConfig) -> str:
    moe = mcfg.moe
    if moe is None:
        return f"hidden {mcfg.hidden_dim}"
    shared = f" + shared {moe.shared_hidden_dim}" if moe.shared_hidden_dim else ""
    return f"{moe.num_experts} experts of {moe.hidden_dim}, top {moe.top_k}{shared}"


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def _load_data(cfg: TrainConfig, rt: Runtime, tokenizer: Tokenizer) -> Corpus:
    """The corpus, the same on every rank. With a tokenizer, global rank 0 builds the token cache
    (if it is not there yet) while the others wait for the file; no collective runs meanwhile."""
    box = [secrets.token_hex(8)]
    dist.broadcast_object_list(box, src=0)  # names this attempt's error file in the cache directory
    cache = CacheOptions(
        Path(cfg.token_cache) if cfg.token_cache else default_cache_dir(), builder=rt.rank == 0, nonce=box[0],
        timeout=cfg.timeout, progress=cfg.progress and rt.rank == 0, log=print if rt.rank == 0 else None,
    )  # fmt: skip
    return agree(
        lambda: load_corpus(
            cfg.data,
            corpus_bytes=cfg.corpus_bytes,
            val_fraction=cfg.val_fraction,
            seq_len=cfg.seq_len,
            tokenizer=tokenizer,
            cache=cache,
        ),
        what="the data (every node needs the same --data, --tokenizer and Python version)",
        describe=lambda corpus: f"{corpus.source}, sha256 {corpus.fingerprint}",
    )


def _evaluate(t: _Trainer, step: int, resume_info: ckpt.CheckpointInfo | None) -> TrainResult:
    """``--eval-only``: the validation loss of the loaded weights, printed and appended to the metrics."""
    val = t.validate()
    ppl = _perplexity(val)
    where = resume_info.path if resume_info is not None else t.cfg.init_from
    t.log(
        f"eval: {where} (step {step}) on {t.corpus.source}: val_loss {val:.4f}, val_ppl {ppl:.2f} "
        f"({t.n_val} validation sequences of {t.cfg.seq_len} tokens)"
    )
    path = t.cfg.metrics_path
    if t.is_main and path is not None:
        log = MetricsLog(path, append=True)
        log.write({"step": step, "val_loss": val, "val_ppl": ppl})
        log.close()
    return TrainResult(
        start_step=step,
        val_losses=[(step, val)],
        final_step=step,
        resumed_from=None if resume_info is None else str(resume_info.path),
    )


def _take_run_lock(cfg: TrainConfig) -> RunLock | None:
    """Rank 0 takes the lock of ``--ckpt-dir`` for this run (not for ``--eval-only``, which writes
    no checkpoint); every rank learns the verdict. Before anything is read or written there, so a
    second run is refused at once and never touches the first one's files (see run_lock.py)."""
    if cfg.ckpt_dir is None or cfg.eval_only:
        return None
    ckpt_dir = cfg.ckpt_dir
    agree(
        lambda: ckpt.check_ckpt_dir(ckpt_dir),  # no lock file in a directory of another kind
        what=f"--ckpt-dir {ckpt_dir} (every rank must see the same directory)",
        where=f"in {os.path.abspath(ckpt_dir)}",
    )
    taken: list[RunLock] = []
    decided_by_rank_0(
        lambda: taken.append(acquire_run_lock(ckpt_dir)) if dist.get_rank() == 0 else None,
        what=f"the lock of --ckpt-dir {ckpt_dir}",
    )
    return taken[0] if taken else None


def _train(cfg: TrainConfig, rt: Runtime) -> TrainResult:
    lock = _take_run_lock(cfg)
    try:
        return _train_locked(cfg, rt)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, rt: Runtime) -> TrainResult:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # A run that started from pretrained weights resumes with its checkpoint's model and tokenizer.
    pretrained_run = agree(
        lambda: _pretrained_run(cfg),
        what=f"the checkpoints in --ckpt-dir {cfg.ckpt_dir} (every rank must see the same directory)",
        describe=lambda found: "none from --init-from" if found is None else f"{found[1].name}: {found[0]!r}",
        where=None if cfg.ckpt_dir is None else f"in {os.path.abspath(cfg.ckpt_dir)}",
    )

    def setup() -> tuple[ParallelPlan, LlamaConfig]:
        return cfg.plan(rt.world), pretrained_run[0] if pretrained_run is not None else _model_config(cfg)

    source = f" in --init-from {cfg.init_from}" if cfg.init_from is not None else ""
    plan, mcfg = agree(setup, what=f"the model config{source}", describe=lambda pm: repr(pm[1]))

    def find_tokenizer() -> Tokenizer:
        if pretrained_run is not None and cfg.tokenizer == "auto":
            return tokenizer_from_checkpoint(pretrained_run[1])
        return resolve_tokenizer(cfg.tokenizer, init_from=cfg.init_from)

    tokenizer = agree(
        find_tokenizer, what="the tokenizer", describe=lambda tok: f"{tok.kind}, fingerprint {tok.fingerprint}"
    )
    agree(
        lambda: cfg.check_model(
            mcfg,
            token_ids=tokenizer.vocab_size,
            tokens=f"its {tokenizer.kind} tokenizer (ids up to {tokenizer.vocab_size - 1})",
        ),
        what="the model config",
    )
    # Opt-in: the resident set then follows the tensors the plan counts, at a cost in speed. A
    # MALLOC_MMAP_THRESHOLD_ in the environment is the user's own setting and wins (no hint then).
    freed_returned = rt.device.type == "cpu" and cfg.return_freed_memory and release_freed_memory()
    freed_returned = freed_returned or "MALLOC_MMAP_THRESHOLD_" in os.environ
    corpus = _load_data(cfg, rt, tokenizer)

    resume_info: ckpt.CheckpointInfo | None = None
    if cfg.ckpt_dir is not None:

        def discover() -> ckpt.CheckpointInfo | None:
            ckpt.check_ckpt_dir(cfg.ckpt_dir)
            info, _ = ckpt.find_latest(cfg.ckpt_dir)
            if info is not None and not cfg.resume and not cfg.eval_only:
                raise UsageError(
                    f"--ckpt-dir {cfg.ckpt_dir} already holds checkpoints (newest: {info.path.name}); "
                    f"pass --resume to continue from it, or choose another directory (nothing was overwritten)"
                )
            if info is not None and cfg.resume:
                _check_resumable(info, mcfg, cfg, corpus, tokenizer)
                ckpt.verify_files(info)
                if cfg.steps < info.step and not cfg.eval_only:
                    raise UsageError(
                        f"--steps {cfg.steps} is below the step of {info.path} ({info.step}): a run cannot go back; "
                        f"pass --steps above {info.step} to continue it (nothing was changed)"
                    )
            if info is None and cfg.eval_only and cfg.init_from is None:
                raise UsageError(f"--eval-only --resume: --ckpt-dir {cfg.ckpt_dir} holds no complete checkpoint")
            return info if cfg.resume else None

        resume_info = agree(
            discover,
            what=f"the checkpoints in --ckpt-dir {cfg.ckpt_dir} (every rank must see the same directory)",
            describe=ckpt.describe,
            where=f"in {os.path.abspath(cfg.ckpt_dir)}",
        )
        if resume_info is not None and cfg.steps == resume_info.step and not cfg.eval_only:
            # A finished job started again (a torchrun restart after the last save, a requeued
            # batch job): done, not an error.
            if rt.rank == 0:
                print(f"{resume_info.path} is already at --steps {cfg.steps}: nothing to do", flush=True)
            return TrainResult(start_step=cfg.steps, final_step=cfg.steps, resumed_from=str(resume_info.path))
        if resume_info is not None:  # before anything is written: each rank digests its share, all agree
            ckpt.verify_checkpoint(resume_info, digests=cfg.verify_checkpoint, group=dist.group.WORLD)
    if cfg.ckpt_dir is not None and rt.rank == 0 and not cfg.eval_only:
        # Partial saves of a run that died (this run holds the lock: no other run is writing them),
        # before the write check below: a full disk may be full of them.
        removed = ckpt.remove_stale_tmp(cfg.ckpt_dir)
        if removed:
            print(f"removed {len(removed)} partial checkpoint(s) of an interrupted save: "
                  f"{', '.join(p.name for p in removed)}", flush=True)  # fmt: skip
    # --eval-only writes no checkpoint (its --ckpt-dir may be read-only); the metrics it appends to.
    check_outputs(None if cfg.eval_only else cfg.ckpt_dir, cfg.metrics_path, rank=rt.rank)
    schedule_steps, schedule_note = lr_schedule_steps(cfg, resume_info.meta if resume_info is not None else None)

    mesh = build_mesh(rt.device, plan.dp, plan.tp, timeout_s=cfg.timeout)
    # Before the model is built: refuse a run that cannot fit (after the checks of the inputs, whose
    # errors say more precisely what is wrong).
    estimate, memory_line = agree(lambda: plan_memory(cfg, plan, mcfg, mesh["tp"], rt.device), what="the memory plan")
    t = _Trainer(cfg, rt, plan, mcfg, corpus, tokenizer, schedule_steps, mesh)
    compute_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    peak, bf16_warning = measure_peak(compute_dtype, rt.device, given_tflops=cfg.peak_tflops)
    baseline = reset_peak(rt.device)
    t.log(
        f"tp_ffn train: world {rt.world} = dp {plan.dp} x tp {plan.tp} ({'nccl' if rt.device.type == 'cuda' else 'gloo'} on {rt.device.type}), "
        f"model {cfg.preset if cfg.init_from is None else cfg.init_from} ({mcfg.num_params() / 1e6:.2f} M params, {_ffn_shape(mcfg)}), "
        f"batch {plan.batch_size} x {cfg.seq_len} = {plan.batch_size * cfg.seq_len} tokens "
        f"(micro {plan.micro_batch} x grad accum {plan.grad_accum} x dp {plan.dp}), sequence parallel {cfg.sequence_parallel}, "
        f"dtype {cfg.dtype}, ffn fuse_gate_up={cfg.ffn_fuse_gate_up} overlap_comm={cfg.ffn_overlap_comm} "
        f"comm_chunks={cfg.ffn_comm_chunks}\n"
        + ("" if tokenizer.kind == "bytes" else f"tokenizer: {tokenizer.describe()}\n")
        + f"data: {corpus.describe()}\n{memory_line}\nMFU against {peak.describe()}"
    )
    if bf16_warning:
        t.log(f"warning: {bf16_warning}")
    t.build(None if resume_info is not None else cfg.init_from)

    step, position = 0, 0
    result = TrainResult(start_step=0)
    if resume_info is not None:
        step, position = t.state.load(resume_info)
        result = TrainResult(start_step=step, resumed_from=str(resume_info.path))
        t.log(
            f"resumed from {resume_info.path} (step {step}, saved at tp {resume_info.meta.get('tp')} x dp {resume_info.meta.get('dp')}, "
            f"now tp {plan.tp} x dp {plan.dp})"
        )
        if schedule_note is not None and not cfg.eval_only:
            t.log(schedule_note)
    metrics_path = cfg.metrics_path
    if cfg.eval_only:
        return _evaluate(t, step, resume_info)
    log = MetricsLog(metrics_path if t.is_main else None, resume_step=step if resume_info is not None else None)
    bar = Progress(cfg.steps, step, enabled=t.is_main and cfg.progress)
    tokens_per_step = plan.batch_size * cfg.seq_len
    flops_per_step = model_flops_per_token(mcfg, cfg.seq_len) * tokens_per_step
    saver = None
    if cfg.ckpt_dir is not None:
        newest = None if resume_info is None else (resume_info.path, checkpoint_bytes(resume_info.meta))
        saver = Saver(cfg.ckpt_dir, keep_last=cfg.keep_last, background=cfg.ckpt_async, newest=newest, warn=bar.write)

    def save(background: bool, *, stopping: bool = False) -> None:
        assert saver is not None and cfg.ckpt_dir is not None
        completed(saver.wait())  # at most one in flight: the previous one first
        state, planner = t.state.snapshot(step, position)
        path = saver.save(state, planner, step, t.meta(), extra_files=t.tokenizer.files, background=background)
        if path is not None:
            result.checkpoints.append(str(path))
        elif saver.pending is None and not stopping:
            bar.write(f"{ckpt.step_dir(cfg.ckpt_dir, step)} exists; not overwritten")

    def completed(path: Path | None) -> None:
        if path is not None:
            result.checkpoints.append(str(path))

    with StopSignals() as stop:
        try:
            while step < cfg.steps:
                lr = t.opt.param_groups[0]["lr"]
                t0 = time.perf_counter()
                loss, norm = t.train_step(position)
                dt = time.perf_counter() - t0
                step += 1
                position += plan.batch_size
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or enable --grad-clip")
                result.losses.append(loss)
                moe_record = {} if mcfg.moe is None else {"aux_loss": t.aux_loss}
                if moe_record:
                    result.aux_losses.append(t.aux_loss)
                log.write(
                    {
                        "step": step,
                        "loss": loss,
                        **moe_record,
                        "lr": lr,
                        "tokens": position * cfg.seq_len,
                        "tokens_per_s": tokens_per_step / dt,
                        "grad_norm": norm,
                        "time_s": dt,
                        "mfu": mfu(flops_per_step, dt, peak.flops, rt.world),
                    }
                )
                val = None
                if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps:
                    val = t.validate()
                    result.val_losses.append((step, val))
                    log.write({"step": step, "val_loss": val, "val_ppl": _perplexity(val)})
                bar.update(loss, tokens_per_step / dt, val)
                if saver is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
                    save(cfg.ckpt_async and step < cfg.steps)  # the last one: written before the run ends
                # One all-reduce of 4 bytes a step: a stop signal on any rank, a background save still
                # being written on any rank, a metrics file that cannot be written (rank 0's).
                term, usr1, writing, unwritable = any_rank(
                    [stop.received == "SIGTERM", stop.received == "SIGUSR1", saver is not None and saver.pending_here(),
                     log.error is not None],
                    rt.device,
                )  # fmt: skip
                if saver is not None:
                    completed(saver.poll(not writing))
                if unwritable:
                    newest = "none" if saver is None or saver.newest_path is None else str(saver.newest_path)
                    decided_by_rank_0(
                        lambda step=step, newest=newest: _metrics_failed(metrics_path, log.error, step, newest),
                        what="the metrics file",
                    )
                if (term or usr1) and step < cfg.steps:
                    result.stopped_by = "SIGTERM" if term else "SIGUSR1"
                    if saver is not None:  # the save in flight first, then this step's (unless it is that one)
                        save(False, stopping=True)
                    break
            if saver is not None:
                completed(saver.wait())
        except FloatingPointError:  # the same on every rank (the loss is all-reduced): finish the save in flight
            if saver is not None:
                completed(saver.wait())
            raise
        except BaseException:
            if saver is not None:
                saver.abandon()  # not every rank may be here: no collective; the next run removes its directory
            raise
        finally:
            bar.close()
            log.close()
    result.final_step = step
    if result.stopped_by is not None:  # the scheduler's grace period is running: no plot, no summary
        return result
    if t.is_main and metrics_path is not None and metrics_path.exists():
        try:
            result.plot = str(plot_metrics(metrics_path))
        except ImportError:
            t.log("matplotlib is not installed: no loss plot")
    if result.losses:
        t.log(
            f"done: step {step}, loss {result.losses[-1]:.4f}"
            + (
                f", val_loss {result.val_losses[-1][1]:.4f}, val_ppl {_perplexity(result.val_losses[-1][1]):.2f}"
                if result.val_losses
                else ""
            )
        )
    measured = torch.tensor([peak_bytes(rt.device) - baseline], dtype=torch.float64, device=rt.device)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    t.log(f"memory: {memory_report(measured.item(), estimate, rt.device, freed_returned=freed_returned)}")
    if result.checkpoints:
        t.log(f"checkpoint: {result.checkpoints[-1]}")
    if result.plot:
        t.log(f"metrics: {metrics_path}\nloss curve: {result.plot}")
    plots: list[Any] = [result.plot]
    dist.broadcast_object_list(plots, src=0)
    result.plot = plots[0]
    return result
