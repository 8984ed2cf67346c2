"""Weights users already have: Hugging Face and Meta Llama checkpoints, at any tensor-parallel size.

Two layouts on disk::

    Hugging Face (LlamaForCausalLM)            Meta (llama reference code)
    config.json                                params.json
    model.safetensors                          consolidated.00.pth
      or model-0000X-of-0000N.safetensors        ... consolidated.{M-1:02d}.pth   (M model-parallel shards)
         + model.safetensors.index.json

Loading reads only this rank's rows or columns of every sharded weight (``safe_open(...).get_slice``
for safetensors, a memory-mapped ``torch.load`` for Meta shards), so a checkpoint written for any
number of shards loads into a :class:`~tp_ffn.models.Transformer` of any TP size. Every key and shape
is checked, and every slice is read, before the first parameter is written: a bad checkpoint leaves
the model as it was.

What each weight looks like in the three places (``hd`` = head_dim, ``M`` Meta shards, ``W`` TP ranks)::

    ours (Meta names)        Hugging Face name                     Meta split   ours (TP)
    tok_embeddings           model.embed_tokens                    dim 1 (*)    replicated
    layers.N.attention.wq    model.layers.N.self_attn.q_proj (**)  dim 0        dim 0 (whole heads)
    layers.N.attention.wk    model.layers.N.self_attn.k_proj (**)  dim 0        dim 0 (whole heads)
    layers.N.attention.wv    model.layers.N.self_attn.v_proj       dim 0        dim 0
    layers.N.attention.wo    model.layers.N.self_attn.o_proj       dim 1        dim 1
    layers.N.feed_forward.w1 model.layers.N.mlp.gate_proj          dim 0        dim 0
    layers.N.feed_forward.w2 model.layers.N.mlp.down_proj          dim 1        dim 1
    layers.N.feed_forward.w3 model.layers.N.mlp.up_proj            dim 0        dim 0
    layers.N.attention_norm  model.layers.N.input_layernorm        replicated   replicated
    layers.N.ffn_norm        model.layers.N.post_attention_layernorm  replicated  replicated
    norm                     model.norm                            replicated   replicated
    output                   lm_head                               dim 0        dim 0

    (*)  Llama 1/2 (ParallelEmbedding); Llama 3's VocabParallelEmbedding splits dim 0. The loader
         tells them apart by the shard shapes; the exporter writes dim 1.
    (**) Hugging Face rotates the two halves of each head (``x[:hd/2]``, ``x[hd/2:]``) where Meta
         rotates adjacent pairs, so its q/k rows are permuted within every head:
         ``hf = meta.view(heads, hd/2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)``.
         The permutation never crosses heads, so a rank's whole heads can be read and unpermuted alone.

Typical use, at any TP size::

    cfg = config_from_pretrained(path)
    model = Transformer(cfg, group=tp_group, dtype=torch.bfloat16, device="meta")
    load_pretrained(model, path, device="cuda")
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import all_gather_along
from ..groups import TPGroup
from .llama import LlamaConfig, Transformer

__all__ = [
    "config_from_hf",
    "config_from_meta",
    "config_from_pretrained",
    "convert_checkpoint",
    "detect_format",
    "export_hf",
    "export_meta",
    "ffn_rule_for",
    "load_hf_checkpoint",
    "load_meta_checkpoint",
    "load_pretrained",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[..., Iterable[Any]]

HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
META_PARAMS = "params.json"
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
# Precomputed rotary tables some checkpoints carry; the model computes its own.
_META_IGNORED = {"rope.freqs"}
_HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"
_HF_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


# --------------------------------------------------------------------------------------------------
# Configs


def ffn_rule_for(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` for which Meta's rule gives exactly ``hidden_dim``.

    Hugging Face configs store the intermediate size itself; :class:`LlamaConfig` derives it from
    ``dim`` with Meta's rule. Preference: no multiplier and the largest power-of-two
    ``multiple_of`` (Llama-2-7B: ``(256, None)``); then a multiplier with the fewest decimals
    (Llama-3-8B's 14336 gives ``(2048, 1.3)``; Meta wrote ``(1024, 1.3)``); then the exact
    ratio. Raises ``ValueError`` when nothing reproduces ``hidden_dim``.
    """
    from ..ffn import llama_ffn_hidden_dim

    for name, v in (("dim", dim), ("hidden_dim", hidden_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")

    def gives(multiple_of: int, mult: float | None) -> bool:
        return llama_ffn_hidden_dim(dim, multiple_of=multiple_of, ffn_dim_multiplier=mult) == hidden_dim

    powers = [1 << k for k in range(hidden_dim.bit_length(), -1, -1) if hidden_dim % (1 << k) == 0]
    for m in powers:
        if gives(m, None):
            return m, None
    base = int(2 * (4 * dim) / 3)  # Meta's h before the multiplier
    for decimals in range(1, 7):
        scale = 10**decimals
        for m in powers:
            # Rounding up to m maps int(mult * base) in (hidden - m, hidden] onto hidden.
            lo, hi = math.floor((hidden_dim - m) / base * scale), math.ceil(hidden_dim / base * scale)
            for k in range(hi, max(lo, 1) - 1, -1):
                mult = k / scale
                if gives(m, mult):
                    return m, mult
    mult = hidden_dim / base
    for _ in range(8):  # a few ulps either way of the exact ratio
        if gives(1, mult):
            return 1, mult
        mult = math.nextafter(mult, math.inf)
    raise ValueError(
        f"intermediate_size: no multiple_of / ffn_dim_multiplier makes Meta's rule give {hidden_dim} for dim {dim}"
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no {what} here") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the {what}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _int_field(data: Mapping[str, Any], key: str, source: Path) -> int:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{source}: {key}: expected an int, got {v!r}")
    return v


def config_from_hf(path: PathLike, *, max_seq_len: int | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``LlamaForCausalLM`` directory (its ``config.json``).

    ``intermediate_size`` becomes the ``multiple_of`` / ``ffn_dim_multiplier`` pair of
    :func:`ffn_rule_for`; ``max_position_embeddings`` becomes ``max_seq_len`` unless given. Missing
    optional fields take Hugging Face's ``LlamaConfig`` defaults. Raises ``ValueError`` naming the
    field for what this model does not implement: ``rope_scaling``, ``attention_bias``,
    ``mlp_bias``, ``tie_word_embeddings``, a ``hidden_act`` other than ``silu``, a ``head_dim``
    other than ``hidden_size / num_attention_heads``, a ``model_type`` other than ``llama``.
    """
    source = Path(path) / HF_CONFIG
    data = _read_json(source, "Hugging Face config.json")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{source}: missing fields {missing}")
    if data.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type: expected 'llama', got {data['model_type']!r}")
    if data.get("rope_scaling") is not None:
        raise ValueError(
            f"{source}: rope_scaling: not supported (only plain rotary embeddings), got {data['rope_scaling']!r}"
        )
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if data.get(key, False):
            raise ValueError(f"{source}: {key}: not supported, expected false, got {data[key]!r}")
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act: expected 'silu', got {data['hidden_act']!r}")
    dim, n_heads = _int_field(data, "hidden_size", source), _int_field(data, "num_attention_heads", source)
    head_dim = data.get("head_dim")
    if head_dim is not None and n_heads > 0 and head_dim * n_heads != dim:
        raise ValueError(
            f"{source}: head_dim: expected hidden_size / num_attention_heads = {dim} / {n_heads}, got {head_dim}"
        )
    try:
        multiple_of, mult = ffn_rule_for(dim, _int_field(data, "intermediate_size", source))
    except ValueError as e:
        raise ValueError(f"{source}: intermediate_size: {e}") from None
    n_kv = data.get("num_key_value_heads")
    return LlamaConfig(
        dim=dim,
        n_layers=_int_field(data, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_heads if n_kv is None else _int_field(data, "num_key_value_heads", source),
        vocab_size=_int_field(data, "vocab_size", source),
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(data.get("rope_theta", 10000.0)),
        max_seq_len=max_seq_len or int(data.get("max_position_embeddings", 2048)),
    )


_META_KNOWN = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope",
}  # fmt: skip


def config_from_meta(path: PathLike, *, max_seq_len: int | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Meta checkpoint directory (its ``params.json``).

    Missing optional fields take Meta's Llama 2 defaults (``multiple_of`` 256, ``norm_eps`` 1e-5,
    ``rope_theta`` 10000). Llama 2's ``"vocab_size": -1`` is read off the embedding in
    ``consolidated.00.pth``. ``max_seq_len`` (params.json carries none; Meta passes it at build
    time) defaults to ``LlamaConfig``'s. Raises ``ValueError`` for ``use_scaled_rope`` (Llama 3.1's
    rope scaling) and for fields it does not know.
    """
    root = Path(path)
    source = root / META_PARAMS
    data = _read_json(source, "Meta params.json")
    unknown = sorted(set(data) - _META_KNOWN)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}; known: {sorted(_META_KNOWN)}")
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in data]
    if missing:
        raise ValueError(f"{source}: missing fields {missing}")
    if data.get("use_scaled_rope", False):
        raise ValueError(f"{source}: use_scaled_rope: not supported (only plain rotary embeddings), got true")
    dim = _int_field(data, "dim", source)
    vocab = _int_field(data, "vocab_size", source)
    if vocab < 1:
        vocab = _meta_vocab_from_shard(root, dim)
    mult = data.get("ffn_dim_multiplier")
    n_kv = data.get("n_kv_heads")
    if max_seq_len is None:
        max_seq_len = _int_field(data, "max_seq_len", source) if "max_seq_len" in data else LlamaConfig.max_seq_len
    return LlamaConfig(
        dim=dim,
        n_layers=_int_field(data, "n_layers", source),
        n_heads=_int_field(data, "n_heads", source),
        n_kv_heads=None if n_kv is None else _int_field(data, "n_kv_heads", source),
        vocab_size=vocab,
        multiple_of=_int_field(data, "multiple_of", source) if "multiple_of" in data else 256,
        ffn_dim_multiplier=None if mult is None else float(mult),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        rope_theta=float(data.get("rope_theta", 10000.0)),
        max_seq_len=max_seq_len,
    )


def _meta_vocab_from_shard(root: Path, dim: int) -> int:
    files = _meta_shard_files(root)
    rows = []
    for file in files:
        emb = _torch_load(file).get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise ValueError(
                f"{file}: vocab_size is -1 in params.json and there is no 2-D tok_embeddings.weight to read it from"
            )
        rows.append(emb.shape[0])
        # A dim-1 split (Llama 1/2) holds every row; a dim-0 split (Llama 3) holds all `dim` columns.
        if emb.shape[1] != dim or len(files) == 1:
            return emb.shape[0]
    return sum(rows)


def detect_format(path: PathLike) -> str:
    """``"hf"`` (config.json + safetensors) or ``"meta"`` (params.json + consolidated.*.pth).

    Raises ``ValueError`` saying what the directory holds otherwise.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected a Hugging Face or Meta checkpoint directory)")
    names = {p.name for p in root.iterdir()}
    hf = HF_CONFIG in names and (HF_SINGLE in names or HF_INDEX in names)
    meta = META_PARAMS in names and any(_META_SHARD.fullmatch(n) for n in names)
    if hf and meta:
        raise ValueError(
            f"{root}: holds both a Hugging Face and a Meta checkpoint; "
            f"load one with load_hf_checkpoint / load_meta_checkpoint"
        )
    if hf:
        return "hf"
    if meta:
        return "meta"
    shown = sorted(names)[:12]
    raise ValueError(
        f"{root}: not a checkpoint this package reads: expected config.json + model.safetensors (or "
        f"model.safetensors.index.json) for Hugging Face, or params.json + consolidated.00.pth for Meta; "
        f"found {shown}{' ...' if len(names) > 12 else ''}"
    )


def config_from_pretrained(path: PathLike, *, max_seq_len: int | None = None) -> LlamaConfig:
    """:func:`config_from_hf` or :func:`config_from_meta`, by :func:`detect_format`."""
    reader = config_from_hf if detect_format(path) == "hf" else config_from_meta
    return reader(path, max_seq_len=max_seq_len)


# --------------------------------------------------------------------------------------------------
# The tensors of a model, in both namings


@dataclass(frozen=True)
class _Entry:
    """One weight: its names, full shape, Meta's split dim, and the heads HF permutes (q, k) or None."""

    name: str
    hf: str
    shape: tuple[int, ...]
    meta_dim: int | None
    heads: int | None = None


def _layout(cfg: LlamaConfig) -> list[_Entry]:
    """Every weight of ``Transformer(cfg)``, in the model's parameter order."""
    d, h, v = cfg.dim, cfg.hidden_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = [_Entry("tok_embeddings.weight", "model.embed_tokens.weight", (v, d), 1)]
    for i in range(cfg.n_layers):
        m, f = f"layers.{i}.", f"model.layers.{i}."
        out += [
            _Entry(m + "attention.wq.weight", f + "self_attn.q_proj.weight", (q, d), 0, cfg.n_heads),
            _Entry(m + "attention.wk.weight", f + "self_attn.k_proj.weight", (kv, d), 0, cfg.kv_heads),
            _Entry(m + "attention.wv.weight", f + "self_attn.v_proj.weight", (kv, d), 0),
            _Entry(m + "attention.wo.weight", f + "self_attn.o_proj.weight", (d, q), 1),
            _Entry(m + "feed_forward.w1.weight", f + "mlp.gate_proj.weight", (h, d), 0),
            _Entry(m + "feed_forward.w2.weight", f + "mlp.down_proj.weight", (d, h), 1),
            _Entry(m + "feed_forward.w3.weight", f + "mlp.up_proj.weight", (h, d), 0),
            _Entry(m + "attention_norm.weight", f + "input_layernorm.weight", (d,), None),
            _Entry(m + "ffn_norm.weight", f + "post_attention_layernorm.weight", (d,), None),
        ]
    out += [
        _Entry("norm.weight", "model.norm.weight", (d,), None),
        _Entry("output.weight", "lm_head.weight", (v, d), 0),
    ]
    return out


def _hf_to_meta_rows(w: Tensor, head_dim: int) -> Tensor:
    """Undo HF's rotary permutation on whole heads of rows ``[heads * head_dim, *]``."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta_to_hf_rows(w: Tensor, head_dim: int) -> Tensor:
    return w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes in a model: ``module.attr``, this rank's ``[start, end)`` on ``dim``."""

    entry: _Entry
    module: nn.Module
    attr: str
    dim: int | None
    start: int
    end: int


def _targets(model: nn.Module) -> list[_Target]:
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a tp_ffn.models.Transformer, got {type(model).__name__}")
    layout = _layout(model.cfg)
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
        out.append(_Target(e, module, attr, dim, start, end))
    return out


def _check_same_model(model: nn.Module, file_cfg: LlamaConfig, source: Path) -> None:
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


# --------------------------------------------------------------------------------------------------
# Readers: validate keys and shapes, then read one slice at a time (in Meta's convention)


class _HFReader:
    """The tensors of a Hugging Face safetensors checkpoint, read lazily with ``get_slice``."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.root = root
        index_path, single = root / HF_INDEX, root / HF_SINGLE
        if index_path.exists():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: expected a 'weight_map' object of tensor name to file name")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, files = None, [HF_SINGLE]
        else:
            raise ValueError(f"{root}: no {HF_SINGLE} or {HF_INDEX} (only safetensors checkpoints are read)")
        self.handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        for name in files:
            file = root / name
            if not file.is_file():
                raise ValueError(f"{index_path}: lists {name}, which is not in {root}")
            try:
                self.handles[name] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
            for key in self.handles[name].keys():
                if weight_map is None:
                    self.where[key] = name
        if weight_map is not None:
            held = {name: set(h.keys()) for name, h in self.handles.items()}
            for key, name in weight_map.items():
                if key not in held[name]:
                    raise ValueError(f"{index_path}: says {key} is in {name}, which does not hold it")
                self.where[key] = name

    def _slice(self, key: str) -> Any:
        return self.handles[self.where[key]].get_slice(key)

    def validate(self, layout: list[_Entry]) -> None:
        expected = {e.hf: e for e in layout}
        present = {k for k in self.where if not k.endswith(_HF_IGNORED_SUFFIX)}
        missing = [k for k in expected if k not in present]
        extra = sorted(present - set(expected))
        if missing or extra:
            raise ValueError(f"{self.root}: missing keys {missing}, unexpected keys {extra}")
        bad = []
        for key, e in expected.items():
            sl = self._slice(key)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if shape != e.shape:
                bad.append(f"{key}: expected shape {e.shape}, got {shape}")
            elif dtype not in _HF_FLOAT_DTYPES:
                bad.append(f"{key}: expected a floating-point dtype, got {dtype}")
        if bad:
            raise ValueError(f"{self.root}: " + "; ".join(bad))

    def read(self, e: _Entry, dim: int | None, start: int, end: int, head_dim: int) -> Tensor:
        sl = self._slice(e.hf)
        if dim is None:
            x = sl[:]
        elif dim == 0:
            x = sl[start:end]
        else:
            x = sl[:, start:end]
        return _hf_to_meta_rows(x, head_dim) if e.heads is not None else x


def _torch_load(file: Path) -> dict[str, Tensor]:
    """``torch.load`` that runs no pickled code and maps the file instead of reading it."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{file}: refused: its pickle asks for more than tensors and plain containers (it may carry "
            f"code, which was not run). Only weights_only checkpoints are loaded. ({first})"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip, mmap and I/O errors all mean "not a checkpoint we read"
        raise ValueError(f"{file}: cannot be read as a torch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{file}: expected a dict of str to Tensor (a Meta state dict), got {type(obj).__name__}")
    return obj


def _meta_shard_files(root: Path) -> list[Path]:
    found = {}
    for p in root.iterdir():
        m = _META_SHARD.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ValueError(f"{root}: no consolidated.XX.pth files")
    if sorted(found) != list(range(len(found))):
        absent = sorted(set(range(max(found) + 1)) - set(found))
        raise ValueError(
            f"{root}: model-parallel shards are missing: no consolidated.{absent[0]:02d}.pth (found {sorted(found)})"
        )
    return [found[i] for i in range(len(found))]


class _MetaReader:
    """The tensors of Meta's ``consolidated.XX.pth`` shards, memory-mapped; slices cross shard borders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = _meta_shard_files(root)
        self.shards = [_torch_load(f) for f in self.files]
        self.split: dict[str, int | None] = {}

    def validate(self, layout: list[_Entry]) -> None:
        expected = {e.name for e in layout}
        problems = []
        for file, shard in zip(self.files, self.shards):
            present = set(shard) - _META_IGNORED
            missing = [k for k in (e.name for e in layout) if k not in present]
            extra = sorted(present - expected)
            if missing or extra:
                problems.append(f"{file.name}: missing keys {missing}, unexpected keys {extra}")
        if problems:
            raise ValueError(f"{self.root}: " + "; ".join(problems))
        bad = []
        for e in layout:
            shapes = [tuple(s[e.name].shape) for s in self.shards]
            if any(not s[e.name].is_floating_point() for s in self.shards):
                bad.append(f"{e.name}: expected a floating-point tensor in every shard")
                continue
            # tok_embeddings: dim 1 in Llama 1/2 (ParallelEmbedding), dim 0 in Llama 3 (VocabParallelEmbedding).
            candidates = [e.meta_dim] if e.name != "tok_embeddings.weight" else [1, 0]
            self.split[e.name] = next((d for d in candidates if _fits(shapes, e.shape, d)), -1)
            if self.split[e.name] == -1:
                how = "in every shard" if e.meta_dim is None else f"split over {len(shapes)} shards on dim {e.meta_dim}"
                bad.append(f"{e.name}: expected full shape {e.shape} {how}, got shard shapes {shapes}")
        if bad:
            raise ValueError(f"{self.root}: " + "; ".join(bad))

    def read(self, e: _Entry, dim: int | None, start: int, end: int, head_dim: int) -> Tensor:
        del head_dim  # Meta's rows are already in the model's convention
        d = self.split[e.name]
        pieces = [s[e.name] for s in self.shards]
        if d is None:
            x = pieces[0]
            return (x if dim is None else x.narrow(dim, start, end - start)).clone()
        lo, hi = (start, end) if dim == d else (0, e.shape[d])
        parts, offset = [], 0
        for p in pieces:
            n = p.shape[d]
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                parts.append(p.narrow(d, a - offset, b - a))
            offset += n
        x = torch.cat(parts, d)  # a copy: nothing refers to the mapped file afterwards
        return x if dim is None or dim == d else x.narrow(dim, start, end - start).clone()


def _fits(shapes: list[tuple[int, ...]], full: tuple[int, ...], d: int | None) -> bool:
    if d is None:
        return all(s == full for s in shapes)
    others = [i for i in range(len(full)) if i != d]
    return (
        all(len(s) == len(full) and all(s[i] == full[i] for i in others) for s in shapes)
        and sum(s[d] for s in shapes) == full[d]
    )


# --------------------------------------------------------------------------------------------------
# Loading


@torch.no_grad()
def _load(model: Transformer, reader: _HFReader | _MetaReader, device: torch.device | str | None) -> None:
    targets = _targets(model)
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
    _check_same_model(model, config_from_hf(root), root / HF_CONFIG)
    with ExitStack() as stack:
        _load(model, _HFReader(root, stack), device)


def load_meta_checkpoint(model: Transformer, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """Load Meta ``consolidated.XX.pth`` shards (any count) into ``model`` (any TP size).

    The shards are opened with ``torch.load(weights_only=True, mmap=True)`` (a file whose pickle
    would run code is refused before anything runs) and each rank copies only the rows or columns
    of its shard, wherever Meta's shard borders fall: MP=2 into TP=1 or TP=3 works. Validation,
    ``device`` and meta-device parameters as in :func:`load_hf_checkpoint`.
    """
    root = Path(path)
    _check_same_model(model, config_from_meta(root), root / META_PARAMS)
    _load(model, _MetaReader(root), device)


def load_pretrained(model: Transformer, path: PathLike, *, device: torch.device | str | None = None) -> None:
    """:func:`load_hf_checkpoint` or :func:`load_meta_checkpoint`, by :func:`detect_format`."""
    loader = load_hf_checkpoint if detect_format(path) == "hf" else load_meta_checkpoint
    loader(model, path, device=device)


# --------------------------------------------------------------------------------------------------
# Writing


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
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
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


def _write_json(data: Mapping[str, Any], file: Path) -> None:
    with open(file, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _write_hf(full: Mapping[str, Tensor], cfg: LlamaConfig, out: Path, progress: Progress | None = None) -> None:
    from safetensors.torch import save_file

    layout = _layout(cfg)
    items = progress(layout, desc="hf tensors") if progress else layout
    tensors = {}
    for e in items:
        x = full[e.name]
        tensors[e.hf] = (_meta_to_hf_rows(x, cfg.head_dim) if e.heads is not None else x).contiguous()
    save_file(tensors, str(out / HF_SINGLE), metadata={"format": "pt"})
    _write_json(_hf_config_dict(cfg, next(iter(full.values())).dtype), out / HF_CONFIG)


def _check_num_shards(cfg: LlamaConfig, num_shards: int) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards: expected a positive int, got {num_shards!r}")
    smallest = min(e.shape[e.meta_dim] for e in _layout(cfg) if e.meta_dim is not None)
    if num_shards > smallest:
        raise ValueError(f"num_shards: expected at most {smallest} (the smallest split dimension), got {num_shards}")


def _write_meta(
    full: Mapping[str, Tensor], cfg: LlamaConfig, out: Path, num_shards: int, progress: Progress | None = None
) -> None:
    layout = _layout(cfg)
    shards = range(num_shards)
    for i in progress(shards, desc="meta shards") if progress else shards:
        shard = {}
        for e in layout:
            x = full[e.name] if e.meta_dim is None else torch.tensor_split(full[e.name], num_shards, e.meta_dim)[i]
            # A copy of just this block: torch.save of a view would write the whole storage.
            shard[e.name] = x.clone(memory_format=torch.contiguous_format)
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
def _gather(model: Transformer) -> dict[str, Tensor]:
    """Full weights (Meta names, CPU) on TP rank 0; an empty dict elsewhere. Collective."""
    targets = _targets(model)
    if any(getattr(t.module, t.attr).device.type == "meta" for t in targets):
        raise ValueError("model: has parameters on the meta device; load or initialise it before exporting")
    tp, full = model.tp, {}
    for t in targets:
        p = getattr(t.module, t.attr).detach()
        x = p if t.dim is None else all_gather_along(p, tp.group, t.dim, t.module.shard_sizes)
        if tp.rank == 0:
            full[t.entry.name] = x.cpu()
    return full


def export_hf(model: Transformer, path: PathLike, *, overwrite: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``LlamaForCausalLM.from_pretrained`` loads.

    Collective over the model's TP group (with data parallelism, call it on one replica's group).
    The full weights are gathered to TP rank 0 (which holds the whole model in CPU memory), q/k
    get HF's rotary permutation, and rank 0 writes into a hidden sibling directory renamed onto
    ``path`` at the end. Raises ``FileExistsError`` for a non-empty ``path`` unless ``overwrite``.
    """
    dest = Path(path)
    _on_rank0(model.tp, lambda: _check_destination(dest, overwrite))
    full = _gather(model)

    def write() -> None:
        with _atomic_dir(dest, overwrite) as tmp:
            _write_hf(full, model.cfg, tmp)

    _on_rank0(model.tp, write)


def export_meta(model: Transformer, path: PathLike, num_shards: int = 1, *, overwrite: bool = False) -> None:
    """Write Meta's ``params.json`` + ``consolidated.00.pth`` ... ``consolidated.{num_shards-1:02d}.pth``.

    Shards are contiguous ``torch.tensor_split`` blocks on Meta's split dims (table above; the
    embedding on dim 1). They are even whenever the sizes divide, as Meta's own code requires;
    otherwise :func:`load_meta_checkpoint` still reads them. ``params.json`` always names
    ``rope_theta`` (Llama 3's and Code Llama's ``ModelArgs`` take it; the original Llama 2 code does
    not, and assumes 10000). Collective and atomic as :func:`export_hf`.
    """
    _check_num_shards(model.cfg, num_shards)
    dest = Path(path)
    _on_rank0(model.tp, lambda: _check_destination(dest, overwrite))
    full = _gather(model)

    def write() -> None:
        with _atomic_dir(dest, overwrite) as tmp:
            _write_meta(full, model.cfg, tmp, num_shards)

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
) -> str:
    """Convert a checkpoint directory to ``to`` (``"hf"`` or ``"meta"``) in one process; returns the source format.

    Tensors keep their dtype and values bit for bit (only q/k rows are permuted). Meta to Meta with
    another ``num_shards`` reshards. ``max_seq_len`` overrides the source's (Meta's params.json has
    none: HF's ``max_position_embeddings`` then comes from ``LlamaConfig``'s default). ``progress``
    wraps the loops, e.g. ``tqdm.tqdm`` (called as ``progress(iterable, desc=...)``). The whole
    model is held in memory once.
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"to: expected 'hf' or 'meta', got {to!r}")
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve():
        raise ValueError(f"dst: expected a directory other than the source, got {dst_path}")
    _check_destination(dst_path, overwrite)
    fmt = detect_format(src_path)
    cfg = config_from_pretrained(src_path, max_seq_len=max_seq_len)
    if to == "meta":
        _check_num_shards(cfg, num_shards)
    layout = _layout(cfg)
    with ExitStack() as stack:
        reader: _HFReader | _MetaReader = _HFReader(src_path, stack) if fmt == "hf" else _MetaReader(src_path)
        reader.validate(layout)
        items = progress(layout, desc=f"read {fmt}") if progress else layout
        full = {e.name: reader.read(e, None, 0, 0, cfg.head_dim) for e in items}
    with _atomic_dir(dst_path, overwrite) as tmp:
        if to == "hf":
            _write_hf(full, cfg, tmp, progress)
        else:
            _write_meta(full, cfg, tmp, num_shards, progress)
    return fmt
