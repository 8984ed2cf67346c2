"""The :class:`~tp_ffn.models.LlamaConfig` of a Hugging Face or Meta checkpoint directory, and which one it is."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..ffn import llama_ffn_hidden_dim
from ..files import JSON_MAX_BYTES, read_json_object  # re-exported: their home was here
from ..safetensors_dir import SafetensorsDir
from .config import LlamaConfig
from .config_bounds import check_config_fits
from .meta_files import load_torch_file, meta_shard_files
from .moe_config import HF_MOE_TYPES, moe_fields_from_hf
from .weight_names import HF_CONFIG, HF_INDEX, HF_SINGLE, META_PARAMS, META_SHARD
from .weights_types import PathLike

__all__ = [
    "JSON_MAX_BYTES", "config_from_hf", "config_from_meta", "config_from_pretrained", "detect_format", "ffn_rule_for",
    "read_json_object", "stored_elements",
]  # fmt: skip


def ffn_rule_for(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` for which Meta's rule gives exactly ``hidden_dim``.

    Hugging Face configs store the intermediate size itself; :class:`LlamaConfig` derives it from
    ``dim`` with Meta's rule. Preference: no multiplier and the largest power-of-two
    ``multiple_of`` (Llama-2-7B: ``(256, None)``); then a multiplier with the fewest decimals
    (Llama-3-8B's 14336 gives ``(2048, 1.3)``; Meta wrote ``(1024, 1.3)``); then the exact
    ratio. Raises ``ValueError`` when nothing reproduces ``hidden_dim``.
    """
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


def _int_field(data: Mapping[str, Any], key: str, source: Path) -> int:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{source}: {key}: expected an int, got {v!r}")
    return v


def _float_field(data: Mapping[str, Any], key: str, default: float, source: Path) -> float:
    """A finite number > 0 (eps, theta, multiplier): JSON's NaN / Infinity or a string would pass ``float``."""
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{source}: {key}: expected a finite number > 0, got {v!r}")
    return float(v)


def _config(source: Path, **fields: Any) -> LlamaConfig:
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_from_hf(path: PathLike, *, max_seq_len: int | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``LlamaForCausalLM`` or ``MixtralForCausalLM`` directory
    (its ``config.json``; Mixtral's expert fields: :mod:`tp_ffn.models.moe_config`).

    ``intermediate_size`` becomes the ``multiple_of`` / ``ffn_dim_multiplier`` pair of
    :func:`ffn_rule_for`; ``max_position_embeddings`` becomes ``max_seq_len`` unless given. Missing
    optional fields take Hugging Face's ``LlamaConfig`` defaults. Raises ``ValueError`` naming the
    field for what this model does not implement: ``rope_scaling``, ``attention_bias``,
    ``mlp_bias``, ``tie_word_embeddings``, a ``hidden_act`` other than ``silu``, a ``head_dim``
    other than ``hidden_size / num_attention_heads``, a ``model_type`` other than ``llama``.
    """
    source = Path(path) / HF_CONFIG
    data = read_json_object(source, "Hugging Face config.json")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{source}: missing fields {missing}")
    model_type = data.get("model_type", "llama")
    if model_type != "llama" and model_type not in HF_MOE_TYPES:
        known = ", ".join(repr(t) for t in HF_MOE_TYPES)
        raise ValueError(f"{source}: model_type: expected 'llama' (or an MoE family: {known}), got {model_type!r}")
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
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        raise ValueError(f"{source}: head_dim: expected an int, got {head_dim!r}")
    if head_dim is not None and n_heads > 0 and head_dim * n_heads != dim:
        raise ValueError(
            f"{source}: head_dim: expected hidden_size / num_attention_heads = {dim} / {n_heads}, got {head_dim}"
        )
    if model_type in HF_MOE_TYPES:  # intermediate_size is each expert's; the dense rule goes unused
        experts, multiple_of, mult = moe_fields_from_hf(data, source), LlamaConfig.multiple_of, None
    else:
        experts = {}
        try:
            multiple_of, mult = ffn_rule_for(dim, _int_field(data, "intermediate_size", source))
        except ValueError as e:
            raise ValueError(f"{source}: intermediate_size: {e}") from None
    n_kv = data.get("num_key_value_heads")
    return _config(
        source,
        dim=dim,
        n_layers=_int_field(data, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_heads if n_kv is None else _int_field(data, "num_key_value_heads", source),
        vocab_size=_int_field(data, "vocab_size", source),
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=_float_field(data, "rms_norm_eps", 1e-6, source),
        rope_theta=_float_field(data, "rope_theta", 10000.0, source),
        max_seq_len=max_seq_len
        or _int_field({"max_position_embeddings": 2048, **data}, "max_position_embeddings", source),
        **experts,
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
    data = read_json_object(source, "Meta params.json")
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
    return _config(
        source,
        dim=dim,
        n_layers=_int_field(data, "n_layers", source),
        n_heads=_int_field(data, "n_heads", source),
        n_kv_heads=None if n_kv is None else _int_field(data, "n_kv_heads", source),
        vocab_size=vocab,
        multiple_of=_int_field(data, "multiple_of", source) if "multiple_of" in data else 256,
        ffn_dim_multiplier=None if mult is None else _float_field(data, "ffn_dim_multiplier", 1.0, source),
        norm_eps=_float_field(data, "norm_eps", 1e-5, source),
        rope_theta=_float_field(data, "rope_theta", 10000.0, source),
        max_seq_len=max_seq_len,
    )


def _meta_vocab_from_shard(root: Path, dim: int) -> int:
    files = meta_shard_files(root)
    rows = []
    for file in files:
        emb = load_torch_file(file).get("tok_embeddings.weight")
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
    meta = META_PARAMS in names and any(META_SHARD.fullmatch(n) for n in names)
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
    """:func:`config_from_hf` or :func:`config_from_meta`, by :func:`detect_format`, checked against
    the weight files beside it (:func:`~tp_ffn.models.config_bounds.check_config_fits`): a config that
    describes more parameters than the files hold is refused here, before a model is built from it."""
    fmt = detect_format(path)
    cfg = (config_from_hf if fmt == "hf" else config_from_meta)(path, max_seq_len=max_seq_len)
    check_config_fits(cfg, stored_elements(path, fmt), str(Path(path) / (HF_CONFIG if fmt == "hf" else META_PARAMS)))
    return cfg


def stored_elements(path: PathLike, fmt: str) -> int:
    """Elements of all tensors in a Hugging Face (safetensors headers only) or Meta (memory-mapped) checkpoint."""
    root = Path(path)
    if fmt == "meta":
        return sum(t.numel() for f in meta_shard_files(root) for t in load_torch_file(f).values())
    return SafetensorsDir(root).stored_elements()
