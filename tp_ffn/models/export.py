"""Writing Llama weights as Hugging Face or Meta checkpoints: from a sharded model, or converting a directory."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import all_gather_shard
from ..groups import TPGroup
from ..sharding import ShardSpec
from .config import LlamaConfig
from .hf_files import HFReader
from .loading import model_config, shard_targets
from .meta_files import MetaReader
from .moe_config import hf_moe_config, qwen2_moe_zero_biases
from .pretrained_config import config_from_pretrained, detect_format
from .weight_names import (
    HF_CONFIG,
    HF_SINGLE,
    META_EMBEDDING_SPLITS,
    META_PARAMS,
    hf_decoder_fields,
    meta_to_hf_rows,
    weight_layout,
)
from .weights_types import PathLike, Progress

__all__ = ["convert_checkpoint", "export_hf", "export_meta", "write_pretrained"]


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path}: exists and is not empty; pass overwrite=True (--force in the script) to replace it"
        )


@contextmanager
def _atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success it takes ``path``'s place in one rename.

    A crash leaves at most a hidden ``.NAME.tmp-*`` sibling, never a half-written ``path``.
    """
    _check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            os.replace(tmp, path)  # rename(2) replaces an empty directory
        elif path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hf_config_dict(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    if cfg.moe is not None:
        return hf_moe_config(cfg, dtype)
    if cfg.qkv_bias:
        raise ValueError("Hugging Face export: LlamaForCausalLM has no q/k/v-only biases (its attention_bias also "
                         "biases o_proj); this model has qkv_bias=True")  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        **hf_decoder_fields(cfg),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _meta_params_dict(cfg: LlamaConfig) -> dict[str, Any]:
    # No max_seq_len: Meta's code passes it to ModelArgs besides **params and would get it twice.
    return {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": cfg.multiple_of,
        "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }


def _embedding_split_dim(embedding_split: str) -> int:
    """The dim of ``tok_embeddings.weight [vocab, dim]`` that Meta shards split: ``"vocab"`` 0, ``"dim"`` 1.

    No size check of its own: ``dim`` is at least every k/v projection's row count, which
    ``_check_num_shards`` already bounds the shard count by.
    """
    if embedding_split not in META_EMBEDDING_SPLITS:
        raise ValueError(
            f"embedding_split: expected 'vocab' (Llama 3, VocabParallelEmbedding) or 'dim' (Llama 2, "
            f"ParallelEmbedding), got {embedding_split!r}"
        )
    return META_EMBEDDING_SPLITS[embedding_split]


def _write_json(data: Mapping[str, Any], file: Path) -> None:
    with open(file, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _write_hf(
    full: Mapping[str, Tensor],
    cfg: LlamaConfig,
    out: Path,
    progress: Progress | None = None,
    config_extra: Mapping[str, Any] | None = None,
) -> None:
    from safetensors.torch import save_file

    dtype = next(iter(full.values())).dtype
    config = _hf_config_dict(cfg, dtype)  # refuses what no HF family holds, before any work
    layout = weight_layout(cfg)
    items = progress(layout, desc="hf tensors") if progress else layout
    tensors = {}
    for e in items:
        x = full[e.name]
        if e.experts:  # one tensor per expert
            tensors.update({key: x[k].contiguous() for k, key in enumerate(e.hf_tensors())})
            continue
        tensors[e.hf] = (meta_to_hf_rows(x, cfg.head_dim) if e.heads is not None else x).contiguous()
    if config["model_type"] == "qwen2_moe" and not cfg.qkv_bias:
        # Qwen2-MoE's q/k/v always carry biases: zeros compute what this model computes.
        tensors.update(qwen2_moe_zero_biases(cfg, dtype))
    save_file(tensors, str(out / HF_SINGLE), metadata={"format": "pt"})
    _write_json({**config, **(config_extra or {})}, out / HF_CONFIG)


def _check_num_shards(cfg: LlamaConfig, num_shards: int) -> None:
    if cfg.qkv_bias:
        raise ValueError("to='meta': Meta's Llama checkpoint format has no attention biases (this model has qkv_bias)")
    if cfg.moe is not None:
        raise ValueError(
            f"to='meta': Meta's Llama checkpoint format has no experts (this model has {cfg.n_experts} per layer); "
            "export it as a Hugging Face checkpoint"
        )
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards: expected a positive int, got {num_shards!r}")
    smallest = min(e.shape[e.meta_dim] for e in weight_layout(cfg) if e.meta_dim is not None)
    if num_shards > smallest:
        raise ValueError(f"num_shards: expected at most {smallest} (the smallest split dimension), got {num_shards}")
    if num_shards not in cfg.tp_sizes():
        # Meta's model code gives each model-parallel rank n_heads // MP query heads and
        # n_kv_heads // MP key/value heads: a shard holding part of a head would load as garbage.
        raise ValueError(
            f"num_shards: Meta's checkpoints hold whole attention heads in every shard, and {num_shards} shards "
            f"would split the model's {cfg.n_heads} query / {cfg.kv_heads} key-value heads; refused (key/value "
            f"heads are not replicated, which would change n_kv_heads); shard counts that work: "
            f"{', '.join(map(str, cfg.tp_sizes()))}"
        )


def _write_meta(
    full: Mapping[str, Tensor],
    cfg: LlamaConfig,
    out: Path,
    num_shards: int,
    progress: Progress | None = None,
    *,
    embedding_dim: int = META_EMBEDDING_SPLITS["vocab"],
) -> None:
    layout = weight_layout(cfg)
    shards = range(num_shards)
    for i in progress(shards, desc="meta shards") if progress else shards:
        shard = {}
        for e in layout:
            d = embedding_dim if e.name == "tok_embeddings.weight" else e.meta_dim
            # Meta shard i holds what rank i of num_shards would; a copy of just that block (torch.save
            # of a view would write the whole storage).
            spec = ShardSpec.replicated(e.shape) if d is None else ShardSpec.split(e.shape, d, i, num_shards)
            shard[e.name] = spec.take(full[e.name], copy=True, name=e.name)
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
        del shard
    _write_json(_meta_params_dict(cfg), out / META_PARAMS)


def _on_rank0(tp: TPGroup, fn: Callable[[], None]) -> None:
    """Run ``fn`` on TP rank 0; every rank of the group raises if it failed (no rank is left waiting)."""
    error: BaseException | None = None
    if tp.rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
    if tp.size > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=dist.get_global_rank(tp.group, 0), group=tp.group)
        if tp.rank != 0 and message[0] is not None:
            raise RuntimeError(f"rank 0 of the tensor-parallel group failed to write: {message[0]}")
    if error is not None:
        raise error


@torch.no_grad()
def _gather(model: nn.Module) -> dict[str, Tensor]:
    """Full weights (Meta names, CPU) on TP rank 0; an empty dict elsewhere. Collective."""
    targets = shard_targets(model)
    if any(getattr(t.module, t.attr).device.type == "meta" for t in targets):
        raise ValueError("model: has parameters on the meta device; load or initialise it before exporting")
    tp: TPGroup = model.tp
    full = {}
    for t in targets:
        x = all_gather_shard(getattr(t.module, t.attr).detach(), t.spec, tp.group)
        if tp.rank == 0:
            full[t.entry.name] = x.cpu()
    return full


def export_hf(model: nn.Module, path: PathLike, *, overwrite: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``LlamaForCausalLM.from_pretrained`` loads.

    Collective over the model's TP group (with data parallelism, call it on one replica's group).
    The full weights are gathered to TP rank 0 (which holds the whole model in CPU memory), q/k
    get HF's rotary permutation, and rank 0 writes into a hidden sibling directory renamed onto
    ``path`` at the end. Raises ``FileExistsError`` for a non-empty ``path`` unless ``overwrite``.
    """
    dest = Path(path)
    cfg = model_config(model)
    _hf_config_dict(cfg, torch.float32)  # a model no HF family holds is refused before any collective
    _on_rank0(model.tp, lambda: _check_destination(dest, overwrite))
    full = _gather(model)

    def write() -> None:
        with _atomic_dir(dest, overwrite) as tmp:
            _write_hf(full, cfg, tmp)

    _on_rank0(model.tp, write)


def export_meta(
    model: nn.Module, path: PathLike, num_shards: int = 1, *, overwrite: bool = False, embedding_split: str = "vocab"
) -> None:
    """Write Meta's ``params.json`` + ``consolidated.00.pth`` ... ``consolidated.{num_shards-1:02d}.pth``.

    Shards are contiguous ``torch.tensor_split`` blocks on Meta's split dims (table above).
    ``tok_embeddings.weight`` is split by vocabulary (``embedding_split="vocab"``, dim 0: Llama 3's
    and llama-models' ``VocabParallelEmbedding``) or by embedding dimension (``"dim"``, dim 1: Llama
    1/2's ``ParallelEmbedding``). ``num_shards`` must give every shard whole attention heads (a
    common divisor of ``n_heads`` and ``n_kv_heads``, as Meta's model code requires): anything else
    raises ``ValueError`` (key/value heads are not replicated). Other blocks are even whenever the
    sizes divide, as Meta's own code requires; otherwise :func:`load_meta_checkpoint` still reads
    them. ``params.json`` always names ``rope_theta`` (Llama 3's and Code Llama's ``ModelArgs`` take
    it; the original Llama 2 code does not, and assumes 10000). Collective and atomic as
    :func:`export_hf`.
    """
    cfg = model_config(model)
    _check_num_shards(cfg, num_shards)
    embedding_dim = _embedding_split_dim(embedding_split)
    dest = Path(path)
    _on_rank0(model.tp, lambda: _check_destination(dest, overwrite))
    full = _gather(model)

    def write() -> None:
        with _atomic_dir(dest, overwrite) as tmp:
            _write_meta(full, cfg, tmp, num_shards, embedding_dim=embedding_dim)

    _on_rank0(model.tp, write)


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    *,
    to: str,
    num_shards: int = 1,
    overwrite: bool = False,
    max_seq_len: int | None = None,
    progress: Progress | None = None,
    embedding_split: str = "vocab",
) -> str:
    """Convert a checkpoint directory to ``to`` (``"hf"`` or ``"meta"``) in one process; returns the source format.

    Tensors keep their dtype and values bit for bit (only q/k rows are permuted). Meta to Meta with
    another ``num_shards`` reshards; ``embedding_split`` is :func:`export_meta`'s (``"vocab"`` for
    Llama 3's code, ``"dim"`` for Llama 2's). ``max_seq_len`` overrides the source's (Meta's
    params.json has none: HF's ``max_position_embeddings`` then comes from ``LlamaConfig``'s
    default). ``progress`` wraps the loops, e.g. ``tqdm.tqdm`` (called as ``progress(iterable,
    desc=...)``). The whole model is held in memory once.
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"to: expected 'hf' or 'meta', got {to!r}")
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve():
        raise ValueError(f"dst: expected a directory other than the source, got {dst_path}")
    _check_destination(dst_path, overwrite)
    fmt = detect_format(src_path)
    cfg = config_from_pretrained(src_path, max_seq_len=max_seq_len)
    embedding_dim = _embedding_split_dim(embedding_split)
    if to == "meta":
        _check_num_shards(cfg, num_shards)
    layout = weight_layout(cfg)
    reader: HFReader | MetaReader = HFReader(src_path) if fmt == "hf" else MetaReader(src_path)
    reader.validate(layout)
    items = progress(layout, desc=f"read {fmt}") if progress else layout
    full = {e.name: reader.read(e, ShardSpec.replicated(e.shape), cfg.head_dim) for e in items}
    with _atomic_dir(dst_path, overwrite) as tmp:
        if to == "hf":
            _write_hf(full, cfg, tmp, progress)
        else:
            _write_meta(full, cfg, tmp, num_shards, progress, embedding_dim=embedding_dim)
    return fmt


def write_pretrained(
    full: Mapping[str, Tensor],
    cfg: LlamaConfig,
    dst: PathLike,
    *,
    to: str,
    num_shards: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
    hf_config: Mapping[str, Any] | None = None,
    extra: Callable[[Path], object] | None = None,
    embedding_split: str = "vocab",
) -> None:
    """Write full weights (Meta names, e.g. from a training checkpoint) as a Hugging Face or Meta directory.

    ``full`` must hold every tensor of ``weight_layout(cfg)`` with its full shape. ``hf_config``
    adds fields to HF's ``config.json`` (e.g. ``bos_token_id``); ``embedding_split`` is
    :func:`export_meta`'s; ``extra(directory)`` writes more
    files (a tokenizer) before the directory is renamed into place, atomically as
    :func:`convert_checkpoint`. Raises ``ValueError`` for missing or misshapen tensors,
    ``FileExistsError`` for a non-empty ``dst`` without ``overwrite``.
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"to: expected 'hf' or 'meta', got {to!r}")
    layout = weight_layout(cfg)
    bad = [
        f"{e.name}: expected {e.shape}, got {None if e.name not in full else tuple(full[e.name].shape)}"
        for e in layout
        if e.name not in full or tuple(full[e.name].shape) != e.shape
    ]
    if bad:
        raise ValueError(
            "weights do not match the model config: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        )
    embedding_dim = _embedding_split_dim(embedding_split)
    if to == "meta":
        _check_num_shards(cfg, num_shards)
    with _atomic_dir(Path(dst), overwrite) as tmp:
        if to == "hf":
            _write_hf(full, cfg, tmp, progress, hf_config)
        else:
            _write_meta(full, cfg, tmp, num_shards, progress, embedding_dim=embedding_dim)
        if extra is not None:
            extra(tmp)
