"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, and reshardable over TP and dp.

Layout of ``--ckpt-dir``::

    DIR/
      step_00000100/              one complete checkpoint (the name is the number of optimizer steps)
        .metadata                 DCP's index: every tensor's global shape and the chunks on disk
        __0_0.distcp ...          one file per rank (replicated tensors written once)
        meta.json                 written last: format, step, model config, tp/dp, data, each file's size and SHA-256
      step_00000200/
      .tmp-step_00000300-1a2b3c/  a save in progress (or one that crashed): never read, removed at start
      metrics.jsonl, metrics.png  (default place of the metrics)

A save (:mod:`tp_ffn.train.checkpoint.saving`) writes into ``.tmp-step_N-<random>/``; each rank digests the
files it wrote, and rank 0 writes ``meta.json`` (with every file's size and digest), fsyncs, and
renames the directory to ``step_N`` in one ``rename(2)``. A crash at any moment leaves either no
``step_N`` or a complete one, and never touches older checkpoints; a failed write removes its
directory. An existing ``step_N`` is never overwritten. The directory also holds the lock of the run
writing into it (``.run.lock``, :mod:`tp_ffn.train.checkpoint.run_lock`).

Reading trusts nothing in the directory: :func:`verify_checkpoint` checks every file's size and
digest against ``meta.json`` and ``meta.json``'s model config against the tensors, and every DCP
read goes through :class:`~tp_ffn.train.checkpoint.safe_dcp.SafeFileSystemReader`, which runs no pickled code
(``meta.json`` itself is the root of trust for the digests, so a hostile directory can match them:
the restricted reader is what keeps it from running anything).

What is saved (flat keys; every tensor with its *global* shape)::

    model.<fqn>                       parameters
    optim.<fqn>.exp_avg / .exp_avg_sq AdamW moments (same blocks as the parameter)
    optim.<fqn>.step                  AdamW step counter (replicated)
    scheduler.last_epoch              LR schedule position (replicated)
    data.position, train.step         sequences consumed, optimizer steps done (replicated)
    rng.cpu [world, L], rng.cuda      each rank's RNG state, one row per rank

Each rank hands DCP its own block of every parameter and AdamW moment, with the block's true global
offsets (:mod:`tp_ffn.train.checkpoint.layout`: ``tensor_split`` over TP, ``torch.chunk`` over FSDP), through
:class:`BlockSavePlanner` / :class:`BlockLoadPlanner` (DCP's default planners, extended at their
documented hooks). DCP writes those chunks and, on load, reads whatever overlaps the blocks the
*loading* ranks hold. So a checkpoint written at tp=2, dp=2 loads at tp=1, dp=4 or at tp=4, and an
uneven hidden size is no special case. (A DTensor ``Shard`` placement could not describe the TP
blocks: it assumes ``torch.chunk`` sizes.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ...models.config_bounds import check_config_fits
from ...models.llama import LlamaConfig
from ...models.weight_names import weight_layout
from ..consensus import agree
from ..errors import UsageError
from .digests import ALGORITHM, file_digest, is_digest
from .layout import Block, local_tensor, param_blocks
from .safe_dcp import (
    INDEX,
    DamagedCheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    damaged,
    is_count,
    is_plain_name,
    regular_file_size,
    unwrap_refusal,
)
from .saving import FORMAT, META, STEP_RE, TMP_PREFIX, SaveError, save_atomic, step_dir

__all__ = [
    "FORMAT",
    "BlockLoadPlanner",
    "BlockSavePlanner",
    "CheckpointInfo",
    "DamagedCheckpointError",
    "SafeFileSystemReader",
    "SaveError",
    "TrainingState",
    "UnsafeCheckpointError",
    "check_ckpt_dir",
    "checkpoint_reader",
    "describe",
    "find_latest",
    "load_full_tensors",
    "open_checkpoint",
    "remove_stale_tmp",
    "save_atomic",
    "step_dir",
    "verify_checkpoint",
    "verify_files",
]

_META_MAX_BYTES = 64 << 20  # ours are a few KB; a bigger one is not read into memory
# Types of the meta.json fields the code reads, so a hostile or damaged file cannot reach them as others.
_META_TYPES: dict[str, type] = {
    "step": int, "world": int, "tp": int, "dp": int, "seq_len": int, "model": dict, "data": dict, "rng": list,
    "files": dict, "args": dict,
}  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Finding checkpoints


def _read_meta(path: Path) -> dict[str, Any]:
    size = regular_file_size(path / META)
    if size is None:
        raise damaged(path, f"{META} is missing")
    if size > _META_MAX_BYTES:
        raise damaged(path, f"{META} is {size} bytes, far more than a checkpoint's {META}; move it out of the way")
    try:
        meta = json.loads((path / META).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise damaged(path, f"{META} cannot be read ({type(e).__name__}: {e}); move it out of the way") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UsageError(f"{path} is not a tp_ffn training checkpoint (format {found!r}, expected {FORMAT!r})")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise damaged(path, f"{META}: {key} is a {type(value).__name__}, expected a {kind.__name__}")
    if not all(isinstance(k, str) for k in meta.get("rng", [])):
        raise damaged(path, f"{META}: rng must list state names")
    return meta


def check_ckpt_dir(ckpt_dir: str | os.PathLike) -> None:
    """Refuse a directory that holds another kind of checkpoint (Hugging Face, Meta, bare DCP)."""
    root = Path(ckpt_dir)
    if not root.exists():
        return
    if not root.is_dir():
        raise UsageError(f"--ckpt-dir {root}: exists and is not a directory")
    names = {p.name for p in root.iterdir()}
    hints = {
        "config.json": "a Hugging Face model", "params.json": "a Meta checkpoint", ".metadata": "a bare DCP checkpoint",
    }  # fmt: skip
    for name, what in hints.items():
        if name in names:
            raise UsageError(
                f"--ckpt-dir {root}: holds {what} ({name}), not tp_ffn training checkpoints; "
                f"to start from weights use --init-from, and give --ckpt-dir a directory of its own"
            )


def find_latest(ckpt_dir: str | os.PathLike) -> tuple[CheckpointInfo | None, list[Path]]:
    """The newest complete checkpoint in ``ckpt_dir`` and the ``step_*`` directories skipped.

    A ``step_N`` directory without ``meta.json`` is not one of ours (ours get it before the rename)
    and is skipped. The newest one that has it must be valid: a damaged or foreign one raises
    :class:`UsageError` rather than silently falling back to an older step.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None, []
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()), reverse=True
    )
    skipped: list[Path] = []
    for step, path in found:
        if not (path / META).exists():
            skipped.append(path)
            continue
        meta = _read_meta(path)
        if meta.get("step") != step:
            raise UsageError(f"checkpoint {path} is damaged: {META} says step {meta.get('step')!r}")
        return CheckpointInfo(path, step, meta), skipped
    return None, skipped


def open_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """One ``step_N`` directory, or the newest complete checkpoint of a ``--ckpt-dir``."""
    p = Path(path)
    m = STEP_RE.match(p.name)
    if m and (p / META).exists():
        meta = _read_meta(p)
        if meta.get("step") != int(m.group(1)):
            raise UsageError(f"checkpoint {p} is damaged: {META} says step {meta.get('step')!r}")
        return CheckpointInfo(p, int(m.group(1)), meta)
    info, _ = find_latest(p)
    if info is None:
        raise UsageError(f"{path}: no complete checkpoint (step_*/{META}) found")
    return info


def _listed_files(info: CheckpointInfo) -> tuple[dict[str, int], dict[str, str] | None]:
    """``meta.json``'s files: ``({name: size}, {name: digest})``; the digests are ``None`` for a
    checkpoint written before they were recorded (its entries are bare sizes)."""
    files = info.meta.get("files")
    if not isinstance(files, dict) or INDEX not in files:
        raise damaged(info.path, f"{META} lists no files")
    legacy = all(is_count(v) for v in files.values())
    sizes: dict[str, int] = {}
    sums: dict[str, str] = {}
    for name, entry in files.items():
        if not is_plain_name(name) or name == META:
            raise damaged(info.path, f"{META} lists {name!r}, which is not a file name inside the checkpoint")
        if legacy:
            sizes[name] = entry
            continue
        if not isinstance(entry, dict) or not is_count(entry.get("size")) or not is_digest(entry.get(ALGORITHM)):
            raise damaged(info.path, f"{META}'s entry for {name} has no size and {ALGORITHM} digest: {entry!r}")
        sizes[name], sums[name] = entry["size"], entry[ALGORITHM]
    return sizes, None if legacy else sums


def verify_files(info: CheckpointInfo) -> None:
    """Check that every file listed in ``meta.json`` is there, a regular file of its size (truncation, deletion)."""
    sizes, _ = _listed_files(info)
    for name, size in sorted(sizes.items()):
        actual = regular_file_size(info.path / name)
        if actual != size:
            got = "missing" if actual is None else f"{actual} bytes"
            raise damaged(info.path, f"{name} is {got}, expected {size} bytes")


def _check_model(info: CheckpointInfo, md: Metadata) -> None:
    """``meta.json``'s model config must describe exactly the ``model.*`` tensors of the index."""
    model = info.meta.get("model")
    try:
        cfg = LlamaConfig(**model) if isinstance(model, dict) else None
    except (TypeError, ValueError) as e:
        raise damaged(info.path, f"{META}'s model config is not valid ({e})") from None
    if cfg is None:
        raise damaged(info.path, f"{META} has no model config")
    stored = {
        k[len("model.") :]: tuple(v.size)
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    try:  # bounds first: the layout below has one entry per weight of the config
        check_config_fits(cfg, sum(math.prod(s) for s in stored.values()), f"{META}'s model config")
    except ValueError as e:
        raise damaged(info.path, str(e)) from None
    expected = {e.name: e.shape for e in weight_layout(cfg)}  # tensors per layer: 9 dense, more with experts
    if len(expected) != len(stored):
        raise damaged(
            info.path, f"{META}'s model config has {cfg.n_layers} layers; {INDEX} holds {len(stored)} model tensors"
        )
    names = sorted(set(expected) | set(stored))
    diff = [f"{k}: config {expected.get(k)}, stored {stored.get(k)}" for k in names if expected.get(k) != stored.get(k)]
    if diff:
        raise damaged(info.path, f"{META}'s model config does not match the tensors in {INDEX} ({'; '.join(diff[:3])})")


_REFUSALS: dict[str, type[UsageError]] = {
    c.__name__: c for c in (UsageError, DamagedCheckpointError, UnsafeCheckpointError)
}


def verify_checkpoint(
    info: CheckpointInfo | str | os.PathLike, *, digests: bool = True, group: dist.ProcessGroup | None = None
) -> Metadata:
    """Check a checkpoint before anything reads its data, and return its DCP index (read safely).
    ``info``: what :func:`open_checkpoint` returns, or a path it accepts (a ``step_N`` directory or
    a ``--ckpt-dir``, whose newest checkpoint is checked).

    Checked: ``meta.json`` lists every file with its size and digest, and each is a regular file of
    that size; ``.metadata`` matches its digest and is a DCP index of tensors only, read without
    running code (:class:`~tp_ffn.train.checkpoint.safe_dcp.SafeFileSystemReader`); the model config in
    ``meta.json`` describes exactly the model tensors in it; and, with ``digests``, every data file
    matches its digest. ``digests=False`` (``--no-verify-checkpoint``) skips only the data files'
    digests (reading the whole checkpoint once), not the rest.

    Collective over ``group`` (``None``: this process alone): each rank digests its share of the
    data files (file ``i`` on rank ``i % world``), so the checkpoint is read once in all, and the
    ranks agree on the verdict: every rank raises the same error, or none does.
    A checkpoint written before digests were recorded passes with a one-line notice on stderr.
    The data files are digested before DCP reads them, not as it reads them: one replaced in between
    is still read only by the restricted reader (no code runs), but unverified.
    Raises :class:`DamagedCheckpointError` or :class:`UnsafeCheckpointError` (both :class:`UsageError`).
    """
    if not isinstance(info, CheckpointInfo):
        info = open_checkpoint(info)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    md, legacy, error = None, False, None
    try:
        md, legacy = _verify_here(info, digests, rank, world)
    except UsageError as e:
        error = (type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - one rank's surprise must not leave the others waiting
        error = ("DamagedCheckpointError", f"checkpoint {info.path} could not be verified ({type(e).__name__}: {e})")
    if world > 1:
        verdicts: list[Any] = [None] * world
        dist.all_gather_object(verdicts, error, group=group)
        error = next((v for v in verdicts if v is not None), None)
    if error is not None:  # agreed when gathered: every rank of the group raises it
        raise _REFUSALS.get(error[0], UsageError)(error[1], agreed=group is not None)
    if legacy and digests and rank == 0:
        print(
            f"notice: checkpoint {info.path} has no digests (written before tp_ffn recorded them): "
            f"sizes checked, contents not verified",
            file=sys.stderr,
            flush=True,
        )
    assert md is not None
    return md


def _verify_here(info: CheckpointInfo, digests: bool, rank: int, world: int) -> tuple[Metadata, bool]:
    _, sums = _listed_files(info)
    verify_files(info)
    md = read_index_of(info, digests=digests)
    _check_model(info, md)
    if digests and sums is not None:
        for name in sorted(n for n in sums if n != INDEX)[rank::world]:
            if file_digest(info.path / name) != sums[name]:
                raise damaged(info.path, f"{name} does not match its digest")
    return md, sums is None


def checkpoint_reader(info: CheckpointInfo, *, digests: bool = True) -> SafeFileSystemReader:
    """The DCP storage reader for ``info``: restricted to the files ``meta.json`` lists, at their sizes,
    and (with ``digests``) to the ``.metadata`` whose digest it records."""
    sizes, sums = _listed_files(info)
    return SafeFileSystemReader(info.path, sizes=sizes, metadata_digest=sums[INDEX] if digests and sums else None)


def read_index_of(info: CheckpointInfo, *, digests: bool = True) -> Metadata:
    """The checked DCP index of ``info`` (see :func:`checkpoint_reader`)."""
    return checkpoint_reader(info, digests=digests).read_metadata()


def describe(info: CheckpointInfo | None) -> str:
    """What a rank found, for comparing across ranks: the step directory and a digest of its meta.json."""
    if info is None:
        return "no checkpoint"
    digest = hashlib.sha256(json.dumps(info.meta, sort_keys=True).encode()).hexdigest()[:12]
    return f"{info.path.name} (meta.json {digest})"


def remove_stale_tmp(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-step_*`` directories left by interrupted saves (rank 0, before training)."""
    root = Path(ckpt_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir() and not p.is_symlink():  # never into a link
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


class BlockSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, except that the tensors named in ``blocks`` are this rank's
    block of a larger tensor: each is written as one chunk at the block's global offsets.

    Ranks holding the same block (replicas over TP) produce the same chunk index, which DCP's
    de-duplication writes once; DCP's global-plan validation then checks that the chunks of every
    tensor do not overlap and cover it exactly.
    """

    def __init__(self, blocks: dict[str, Block]) -> None:
        super().__init__()
        self.blocks = blocks

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [item for item in plan.items if item.index.fqn not in self.blocks]
        for fqn, b in self.blocks.items():
            if fqn not in self.state_dict or not b.numel:
                continue
            offsets = torch.Size(b.offsets)
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(b.sizes)),
                        properties=TensorProperties.create_from_tensor(self.state_dict[fqn]),
                        size=torch.Size(b.global_shape),
                    ),
                )
            )
        # A staged copy (--ckpt-async) may sit in pinned memory: the index must not say so, so that
        # it is the same bytes as a synchronous save of the same state.
        items = [_unpinned(item) for item in items]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.blocks:
            return self.state_dict[index.fqn]
        return super().lookup_object(index)


def _unpinned(item: WriteItem) -> WriteItem:
    data = item.tensor_data
    if data is None or not data.properties.pin_memory:
        return item
    props = dataclasses.replace(data.properties, pin_memory=False)
    return dataclasses.replace(item, tensor_data=dataclasses.replace(data, properties=props))


class BlockLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that the tensors named in ``blocks`` receive this rank's
    block: it reads every saved chunk that overlaps the block, whatever layout wrote them."""

    def __init__(self, blocks: dict[str, Block]) -> None:
        super().__init__()
        self.blocks = blocks

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata
        plain = {k: v for k, v in self.state_dict.items() if k not in self.blocks}
        requests = list(create_default_local_load_plan(plain, md, not self.allow_partial_load).items)
        for fqn, b in self.blocks.items():
            if fqn not in self.state_dict:
                continue
            saved = md.state_dict_metadata.get(fqn)
            if not isinstance(saved, TensorStorageMetadata):
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            if tuple(saved.size) != b.global_shape:
                raise ValueError(
                    f"Size mismatch between saved {tuple(saved.size)} and current: {b.global_shape} for {fqn}"
                )
            if b.numel:
                chunk = ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes))
                requests.extend(create_read_items_for_chunk_list(fqn, saved, [chunk]))
        self.plan = LoadPlan(requests)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        if index.fqn in self.blocks:
            return self.state_dict[index.fqn]
        return super().lookup_tensor(index)


class TrainingState:
    """This rank's DCP state dict for a model (and optionally its optimizer and scheduler).

    Sharded tensors appear as the local tensors themselves (aliasing the live parameters and
    optimizer moments, so a load writes into them in place); :attr:`blocks` says where each sits in
    the full tensor, for :class:`BlockSavePlanner` / :class:`BlockLoadPlanner`. ``group``: the ranks
    that load together (default: the world), e.g. one TP group.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.param_blocks = param_blocks(model)
        self.params = dict(model.named_parameters())
        self.distributed = _is_dist()
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.blocks: dict[str, Block] = {}
        for key, b in self.param_blocks.items():
            self.blocks[f"model.{key}"] = b
            if optimizer is not None:
                self.blocks[f"optim.{key}.exp_avg"] = b
                self.blocks[f"optim.{key}.exp_avg_sq"] = b

    def _rng_rows(self, key: str, state: Tensor) -> Tensor:
        """Rank r's RNG state as row r of a ``[world, L]`` tensor."""
        rows = state.reshape(1, -1)
        self.blocks[key] = Block((self.world, rows.shape[1]), (self.rank, 0), tuple(rows.shape), True)
        return rows

    @torch.no_grad()
    def state_dict(
        self, *, step: int = 0, position: int = 0, rng: bool = True, model_only: bool = False
    ) -> dict[str, Any]:
        """Tensors that alias the live model / optimizer, and the scalars."""
        sd: dict[str, Any] = {}
        for key, p in self.params.items():
            sd[f"model.{key}"] = local_tensor(p.detach())
        if model_only:
            return sd
        if self.optimizer is not None:
            for key, p in self.params.items():
                state = self.optimizer.state[p]
                for name in ("exp_avg", "exp_avg_sq"):
                    sd[f"optim.{key}.{name}"] = local_tensor(state[name])
                sd[f"optim.{key}.step"] = state["step"]
        if self.scheduler is not None:
            sd["scheduler.last_epoch"] = torch.tensor(self.scheduler.last_epoch, dtype=torch.int64)
        sd["train.step"] = torch.tensor(step, dtype=torch.int64)
        sd["data.position"] = torch.tensor(position, dtype=torch.int64)
        if rng:
            sd["rng.cpu"] = self._rng_rows("rng.cpu", torch.get_rng_state())
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                sd["rng.cuda"] = self._rng_rows("rng.cuda", torch.cuda.get_rng_state())
        return sd

    def save(
        self,
        ckpt_dir: str | os.PathLike,
        step: int,
        position: int,
        meta: dict[str, Any],
        *,
        keep_last: int = 0,
        extra_files: Mapping[str, Path] | None = None,
    ) -> Path | None:
        """:func:`save_atomic` of the whole training state."""
        sd, planner = self.snapshot(step, position)
        return save_atomic(ckpt_dir, step, sd, meta, planner=planner, keep_last=keep_last, extra_files=extra_files)

    def snapshot(self, step: int, position: int) -> tuple[dict[str, Any], BlockSavePlanner]:
        """What a save hands DCP: the state dict (aliasing the live tensors) and its planner."""
        return self.state_dict(step=step, position=position), BlockSavePlanner(self.blocks)

    def load(self, info: CheckpointInfo, *, model_only: bool = False) -> tuple[int, int]:
        """Load ``info`` into the model (and optimizer, scheduler, RNG); return ``(step, position)``.

        The RNG states are restored only when the world size is the one that saved them (they are
        per rank); a resharded run keeps the freshly seeded generators. Collective over ``group``.
        The files' sizes are checked and DCP reads through :func:`checkpoint_reader` (no pickled code
        runs); the data files' digests are :func:`verify_checkpoint`'s job, which the callers run first.
        """
        agree(lambda: verify_files(info), what=f"the files of checkpoint {info.path}", group=self.group)
        same_world = info.meta.get("world") == self.world
        rng_keys = (
            sorted(set(info.meta.get("rng", [])) & {"rng.cpu", "rng.cuda"}) if same_world and not model_only else []
        )
        if "rng.cuda" in rng_keys and not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            rng_keys.remove("rng.cuda")
        sd = self.state_dict(rng=False, model_only=model_only)
        for key in rng_keys:
            sd[key] = self._rng_rows(key, _rng_buffer(key))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # sample.py's one process
                reader = checkpoint_reader(info)
                # A refusal here is a plain error (not one wrapped by DCP), the same on every rank.
                agree(reader.read_metadata, what=f"the index of checkpoint {info.path}", group=self.group)
                dcp.load(
                    sd, storage_reader=reader, planner=BlockLoadPlanner(self.blocks), process_group=self.group,
                    no_dist=not self.distributed,
                )  # fmt: skip
        except (Exception, dcp.CheckpointException) as e:  # a BaseException carrying every rank's failure
            raise _load_error(info, e) from None
        for key in rng_keys:
            (torch.set_rng_state if key == "rng.cpu" else torch.cuda.set_rng_state)(sd[key].reshape(-1).clone())
        if self.scheduler is not None and not model_only:
            _restore_scheduler(self.scheduler, int(sd["scheduler.last_epoch"]))
        if model_only:
            return 0, 0
        return int(sd["train.step"]), int(sd["data.position"])


def _load_error(info: CheckpointInfo, e: BaseException) -> UsageError:
    """A failed DCP load as one line; the safe reader's refusals (maybe inside DCP's exception, which
    every rank raises with every rank's failures) as they are. Agreed: every rank raises it."""
    if isinstance(e, UsageError):
        return e
    refusal = unwrap_refusal(e)
    if refusal is None:
        return UsageError(f"checkpoint {info.path} could not be loaded: {_last_line(e)}", agreed=True)
    refusal.agreed = True
    return refusal


def _last_line(e: BaseException) -> str:
    """The innermost error message of an exception (DCP's carry every rank's traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _rng_buffer(key: str) -> Tensor:
    return (torch.get_rng_state() if key == "rng.cpu" else torch.cuda.get_rng_state()).clone()


def _restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, last_epoch: int) -> None:
    """Put a LambdaLR at ``last_epoch`` and set each group's lr as its ``step()`` would have."""
    scheduler.last_epoch = last_epoch
    scheduler._step_count = last_epoch + 1
    lrs = [base * fn(last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def load_full_tensors(path: str | os.PathLike, prefix: str = "model.", *, verify: bool = True) -> dict[str, Tensor]:
    """Every tensor under ``prefix`` in a checkpoint, whole, in this one process (no process group
    needed): for tests, export and inspection.

    ``path`` is a ``step_N`` directory or a ``--ckpt-dir`` (its newest checkpoint). The checkpoint
    is checked by :func:`verify_checkpoint` first (``verify=False``: without the data files'
    digests) and read without running pickled code. Raises :class:`UsageError` (a
    :class:`DamagedCheckpointError` / :class:`UnsafeCheckpointError` for a bad checkpoint).
    """
    info = open_checkpoint(path)
    md = verify_checkpoint(info, digests=verify)
    sd = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # it is: one process
            reader = checkpoint_reader(info, digests=verify)
            reader.read_metadata()
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - reported as one line
        raise _load_error(info, e) from None
    return {k[len(prefix) :]: v for k, v in sd.items()}
