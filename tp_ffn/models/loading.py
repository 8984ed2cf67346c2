"""Loading Hugging Face or Meta weights into a :class:`~tp_ffn.models.Transformer` of any TP size.

Each rank reads only its rows or columns of every sharded weight; every key and shape is checked,
and every slice read, before the first parameter is written.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .hf_files import HFReader
from .llama import LlamaConfig, Transformer
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
    "shard_targets",
]


@dataclass(frozen=True)
class ShardTarget:
    """Where one checkpoint tensor goes in a model: ``module.attr``, this rank's ``[start, end)`` on ``dim``."""

    entry: WeightEntry
    module: nn.Module
    attr: str
    dim: int | None
    start: int
    end: int


def shard_targets(model: nn.Module) -> list[ShardTarget]:
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a tp_ffn.models.Transformer, got {type(model).__name__}")
    layout = weight_layout(model.cfg)
    params = dict(model.named_parameters())
    missing = [e.name for e in layout if e.name not in params]
    extra = sorted(set(params) - {e.name for e in layout})
    if missing or extra:
        raise ValueError(f"model: parameters do not match a Llama Transformer: missing {missing}, unexpected {extra}")
    out = []
    for e in layout:
        prefix, _, attr = e.name.rpartition(".")
        module = model.get_submodule(prefix)
        dim = getattr(module, "shard_dim", None)
        start, end = (module.start, module.end) if dim is not None else (0, 0)
        local = list(e.shape)
        if dim is not None:
            local[dim] = end - start
        if tuple(params[e.name].shape) != tuple(local):
            got = tuple(params[e.name].shape)
            raise ValueError(f"model: {e.name} has shape {got}, expected {tuple(local)} for its config")
        if e.heads is not None and dim == 0 and (start % model.cfg.head_dim or end % model.cfg.head_dim):
            raise ValueError(f"model: {e.name} rows [{start}, {end}) do not hold whole heads of {model.cfg.head_dim}")
        out.append(ShardTarget(e, module, attr, dim, start, end))
    return out


def check_same_model(model: nn.Module, file_cfg: LlamaConfig, source: Path) -> None:
    """The checkpoint must describe the model's shapes and numerics (``max_seq_len`` may differ)."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a tp_ffn.models.Transformer, got {type(model).__name__}")
    model_cfg = model.cfg
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta")
    diff = [
        f"{f}: model {getattr(model_cfg, f)}, checkpoint {getattr(file_cfg, f)}"
        for f in fields
        if getattr(model_cfg, f) != getattr(file_cfg, f)
    ]
    if diff:
        raise ValueError(f"{source}: the checkpoint's config does not match the model's: " + "; ".join(diff))


@torch.no_grad()
def _load(model: Transformer, reader: HFReader | MetaReader, device: torch.device | str | None) -> None:
    targets = shard_targets(model)
    reader.validate([t.entry for t in targets])
    hd = model.cfg.head_dim
    values = []
    for t in targets:
        param = getattr(t.module, t.attr)
        x = reader.read(t.entry, t.dim, t.start, t.end, hd)
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


def load_hf_checkpoint(model: Transformer, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load a Hugging Face ``LlamaForCausalLM`` safetensors checkpoint into ``model`` (any TP size).

    Each rank reads only its slices of the sharded weights (``get_slice(name)[start:end]``), undoes
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
    with ExitStack() as stack:
        _load(model, HFReader(root, stack), device)


def load_meta_checkpoint(model: Transformer, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load Meta ``consolidated.XX.pth`` shards (any count) into ``model`` (any TP size).

    The shards are opened with ``torch.load(weights_only=True, mmap=True)`` (a file whose pickle
    would run code is refused before anything runs) and each rank copies only the rows or columns
    of its shard, wherever Meta's shard borders fall: MP=2 into TP=1 or TP=3 works. Validation,
    ``device`` and meta-device parameters as in :func:`load_hf_checkpoint`.
    """
    root = Path(path)
    check_same_model(model, config_from_meta(root), root / META_PARAMS)
    _load(model, MetaReader(root), device)


def load_pretrained(model: Transformer, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """:func:`load_hf_checkpoint` or :func:`load_meta_checkpoint`, by :func:`detect_format`."""
    loader = load_hf_checkpoint if detect_format(path) == "hf" else load_meta_checkpoint
    loader(model, path, device=device)
