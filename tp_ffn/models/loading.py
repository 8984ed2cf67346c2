"""Loading Hugging Face or Meta weights into a :class:`~tp_ffn.models.Transformer` of any TP size.

Each rank reads only the blocks of every weight that its layer's :class:`~tp_ffn.sharding.ShardSpec`
says it holds; every key and shape is checked, and every slice read, before the first parameter is
written. This module sits below the model (:mod:`tp_ffn.models.llama` imports it for its one-call
``load_pretrained``), so it knows a Transformer by its ``cfg`` and parameter names, not its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..sharding import ShardSpec, shard_spec_of
from .config import LlamaConfig
from .hf_files import HFReader
from .meta_files import MetaReader
from .pretrained_config import config_from_hf, config_from_meta, detect_format
from .weight_names import HF_CONFIG, META_PARAMS, WeightEntry, weight_layout
from .weights_types import PathLike

__all__ = [
    "ShardTarget",
    "check_same_model",
    "load_hf_checkpoint",
    "load_meta_checkpoint",
    "load_pretrained",
    "load_weights",
    "model_config",
    "shard_targets",
]


@dataclass(frozen=True)
class ShardTarget:
    """Where one checkpoint tensor goes in a model: ``module.attr``, and what this rank holds of it."""

    entry: WeightEntry
    module: nn.Module
    attr: str
    spec: ShardSpec


def model_config(model: nn.Module) -> LlamaConfig:
    """The config of a :class:`~tp_ffn.models.Transformer`; ``TypeError`` for anything else."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, LlamaConfig):
        raise TypeError(f"model: expected a tp_ffn.models.Transformer, got {type(model).__name__}")
    return cfg


def shard_targets(model: nn.Module) -> list[ShardTarget]:
    """Every weight of ``model`` in :func:`weight_layout` order, with the spec its layer publishes."""
    cfg = model_config(model)
    layout = weight_layout(cfg)
    params = dict(model.named_parameters())
    missing = [e.name for e in layout if e.name not in params]
    extra = sorted(set(params) - {e.name for e in layout})
    if missing or extra:
        raise ValueError(f"model: parameters do not match a Llama Transformer: missing {missing}, unexpected {extra}")
    out = []
    for e in layout:
        prefix, _, attr = e.name.rpartition(".")
        module = model.get_submodule(prefix)
        spec = shard_spec_of(module, attr, params[e.name])
        got = tuple(params[e.name].shape)
        if spec.shape != e.shape:
            raise ValueError(f"model: {e.name} has full shape {spec.shape}, expected {e.shape} for its config")
        if got != spec.local_shape:
            raise ValueError(f"model: {e.name} has shape {got}, expected {spec.local_shape} for its config")
        cut = [i for s, end in spec.blocks for i in (s, end)] if spec.dim == 0 else []
        if e.heads is not None and any(i % cfg.head_dim for i in cut):
            raise ValueError(f"model: {e.name} rows {list(spec.blocks)} do not hold whole heads of {cfg.head_dim}")
        out.append(ShardTarget(e, module, attr, spec))
    return out


def check_same_model(model: nn.Module, file_cfg: LlamaConfig, source: Path) -> None:
    """The checkpoint must describe the model's shapes and numerics (``max_seq_len`` may differ)."""
    model_cfg = model_config(model)
    fields = (
        "dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta", "moe", "qkv_bias",
    )  # fmt: skip
    diff = [
        f"{f}: model {getattr(model_cfg, f)}, checkpoint {getattr(file_cfg, f)}"
        for f in fields
        if getattr(model_cfg, f) != getattr(file_cfg, f)
    ]
    if diff:
        raise ValueError(f"{source}: the checkpoint's config does not match the model's: " + "; ".join(diff))


@torch.no_grad()
def _load(model: nn.Module, reader: HFReader | MetaReader, device: torch.device | str | None) -> None:
    targets = shard_targets(model)
    reader.validate([t.entry for t in targets])
    hd = model.cfg.head_dim
    values = []
    for t in targets:
        param = getattr(t.module, t.attr)
        x = reader.read(t.entry, t.spec, hd)
        on_meta = param.device.type == "meta"
        target_device = (torch.device("cpu") if device is None else torch.device(device)) if on_meta else param.device
        values.append(x.to(device=target_device, dtype=param.dtype))
    # Everything is validated and read: only now is the model touched.
    for t, x in zip(targets, values):
        param = getattr(t.module, t.attr)
        if param.device.type == "meta":
            setattr(t.module, t.attr, nn.Parameter(x, requires_grad=param.requires_grad))
        else:
            param.copy_(x)
    if device is not None:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.device != torch.device(device):
                    setattr(module, name, buf.to(device))


def load_hf_checkpoint(model: nn.Module, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load a Hugging Face ``LlamaForCausalLM`` safetensors checkpoint into ``model`` (any TP size).

    Each rank reads only its blocks of the sharded weights (a chunk at a time), undoes
    HF's rotary permutation of q/k on its own heads, and casts to the model's dtype. The config must
    describe the model's shapes and numerics; every key and shape is checked and every slice read
    before the first parameter is written (a materialised model briefly holds its shard twice).
    Parameters on the ``meta`` device are replaced by new ones on ``device`` (default CPU); others
    are copied into. ``device`` also moves the buffers.
    Not a collective: ranks need not call it together. Raises ``ValueError`` naming missing /
    unexpected keys, wrong shapes or a config mismatch.
    """
    root = Path(path)
    check_same_model(model, config_from_hf(root), root / HF_CONFIG)
    _load(model, HFReader(root), device)


def load_meta_checkpoint(model: nn.Module, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load Meta ``consolidated.XX.pth`` shards (any count) into ``model`` (any TP size).

    The shards are opened with ``torch.load(weights_only=True, mmap=True)`` (a file whose pickle
    would run code is refused before anything runs) and each rank copies only the rows or columns
    of its shard, wherever Meta's shard borders fall: MP=2 into TP=1 or TP=3 works. Validation,
    ``device`` and meta-device parameters as in :func:`load_hf_checkpoint`.
    """
    root = Path(path)
    check_same_model(model, config_from_meta(root), root / META_PARAMS)
    _load(model, MetaReader(root), device)


def load_weights(model: nn.Module, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load a checkpoint directory's weights into an existing ``model`` (any TP size):
    :func:`load_hf_checkpoint` or :func:`load_meta_checkpoint`, by :func:`detect_format`.

    To build the model from the directory as well, in one call, use
    :func:`tp_ffn.models.llama.load_pretrained` (``Transformer.from_pretrained``).
    """
    loader = load_hf_checkpoint if detect_format(path) == "hf" else load_meta_checkpoint
    loader(model, path, device=device)


# The name this function had (``tp_ffn.models.load_pretrained(model, path)``); kept for callers.
# Not ``tp_ffn.models.llama.load_pretrained(path, ...)``, which builds the model too.
load_pretrained = load_weights
