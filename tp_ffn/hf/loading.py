"""``from_pretrained`` for a tensor-parallel model: build on the meta device, then read from the safetensors
files only what this rank keeps (its slices of every MLP, the other tensors whole)."""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..groups import GroupLike, resolve_group
from ..safetensors_dir import SafetensorsDir
from ..sharding import shard_spec_of
from .mlp import parallelize_mlp
from .moe import load_moe_blocks

__all__ = ["from_pretrained"]

# Hugging Face from_pretrained arguments this loader does not implement, and why.
_UNSUPPORTED = {
    "tp_plan": "tp_ffn shards the MLPs itself; a DTensor plan for the other layers is applied after loading",
    "tp_size": "the tensor-parallel size is the size of `group`",
    "device_mesh": "pass the tensor-parallel group (or a 1-D mesh) as `group`",
    "distributed_config": "pass the tensor-parallel group as `group`",
    "quantization_config": "quantized checkpoints are not read",
    "load_in_8bit": "quantized loading is not supported",
    "load_in_4bit": "quantized loading is not supported",
    "gguf_file": "only safetensors checkpoints are read",
    "from_tf": "only safetensors checkpoints are read",
    "from_flax": "only safetensors checkpoints are read",
    "variant": "only model.safetensors (or its index) is read",
    "max_memory": "every rank holds its model on one device",
    "offload_folder": "offloading is not supported",
    "offload_state_dict": "offloading is not supported",
    "offload_buffers": "offloading is not supported",
    "key_mapping": "checkpoint keys must be the model's",
    "output_loading_info": "missing keys are an error and unexpected keys a warning",
    "revision": "`path` is a local directory (download it first, e.g. huggingface_hub.snapshot_download)",
    "cache_dir": "`path` is a local directory",
    "token": "`path` is a local directory",
    "local_files_only": "`path` is a local directory",
    "force_download": "`path` is a local directory",
    "proxies": "`path` is a local directory",
    "subfolder": "pass the subfolder as `path`",
}
_IGNORED = ("low_cpu_mem_usage", "_fast_init")  # loading is always on the meta device


@dataclass
class _LoadOptions:
    """The keyword arguments of :func:`from_pretrained`, validated in one place."""

    dtype: torch.dtype | str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attn_implementation: str | None = None
    config: Any = None
    config_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> _LoadOptions:
        kwargs = dict(kwargs)
        for name in _IGNORED:
            kwargs.pop(name, None)
        bad = sorted(k for k in kwargs if k in _UNSUPPORTED)
        if bad:
            raise ValueError(f"{bad[0]}: not supported by tp_ffn.hf.from_pretrained ({_UNSUPPORTED[bad[0]]})")
        if kwargs.pop("trust_remote_code", None):
            raise ValueError("trust_remote_code: expected False (no checkpoint may run code), got True")
        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError(
                "use_safetensors: expected True or None (only safetensors checkpoints are read), got False"
            )
        opts = cls()
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype: got both dtype={dtype!r} and torch_dtype={torch_dtype!r}; pass one")
        opts.dtype = _parse_dtype(dtype if dtype is not None else torch_dtype)
        opts.device = _parse_device(kwargs.pop("device_map", None))
        opts.attn_implementation = kwargs.pop("attn_implementation", None)
        opts.config = kwargs.pop("config", None)
        opts.config_kwargs = kwargs
        return opts


def _parse_dtype(value: Any) -> torch.dtype | str | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ValueError(f"dtype: expected a torch.dtype, its name or 'auto', got {value!r}")


def _parse_device(value: Any) -> torch.device:
    """``device_map``: one device for the whole model (each rank holds its model on one device), also in
    accelerate's spelling ``{"": device}``."""
    if value is None:
        return torch.device("cpu")
    if isinstance(value, Mapping) and list(value) == [""]:
        value = value[""]
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if isinstance(value, (str, torch.device)) and str(value) not in ("auto", "balanced", "sequential"):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(f"device_map: expected one device for the whole model (e.g. 'cuda:0', 0, 'cpu'), got {value!r}")


def require_hf_extra(caller: str) -> None:
    """``ImportError`` naming the ``hf`` extra when a package it brings is missing."""
    missing = []
    for name in ("transformers", "safetensors", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{caller} needs {', '.join(missing)} (not installed): pip install 'tp-ffn[hf]'")


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _resolve_class_and_config(model_class: type, root: Path, opts: _LoadOptions) -> tuple[type, Any]:
    """The concrete model class (an Auto class is resolved through the config) and the config, with the
    config overrides of ``kwargs`` applied as ``from_pretrained`` would."""
    from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

    if not isinstance(model_class, type):
        raise TypeError(f"model_class: expected a transformers model class, got {type(model_class).__name__}")
    auto = not issubclass(model_class, PreTrainedModel)
    if auto and not hasattr(model_class, "_model_mapping"):
        raise TypeError(
            f"model_class: expected a transformers PreTrainedModel or Auto class, got {model_class.__name__}"
        )
    if opts.config is not None:
        if not isinstance(opts.config, PretrainedConfig):
            raise TypeError(f"config: expected a transformers PretrainedConfig, got {type(opts.config).__name__}")
        if opts.config_kwargs:
            raise TypeError(f"from_pretrained: unexpected keyword arguments {sorted(opts.config_kwargs)} with config=")
        config = opts.config
    else:
        if not (root / "config.json").is_file():
            raise ValueError(f"path: expected a directory with config.json, got {root}")
        reader = AutoConfig if auto else model_class.config_class
        config, unused = reader.from_pretrained(str(root), return_unused_kwargs=True, **opts.config_kwargs)
        if unused:
            raise TypeError(
                f"from_pretrained: unexpected keyword arguments {sorted(unused)} (neither a loading option nor a "
                f"field of {type(config).__name__})"
            )
    if auto:
        try:
            model_class = model_class._model_mapping[type(config)]
        except KeyError:
            raise ValueError(
                f"model_class: {model_class.__name__} has no model for {type(config).__name__} ({root})"
            ) from None
    return model_class, config


def _resolve_dtype(dtype: torch.dtype | str | None, config: Any, files: SafetensorsDir) -> torch.dtype:
    """As ``from_pretrained``: unset means the default dtype (transformers 4) or ``"auto"`` (5); ``"auto"``
    is the config's dtype, else that of the checkpoint's first floating-point tensor."""
    if dtype is None:
        dtype = "auto" if transformers_major() >= 5 else torch.get_default_dtype()
    if dtype == "auto":
        saved = getattr(config, "dtype", None) if transformers_major() >= 5 else None
        saved = saved if saved is not None else getattr(config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = getattr(torch, saved, None)
        if not isinstance(saved, torch.dtype):
            first = files.first_float_dtype()
            saved = getattr(torch, first) if first else torch.get_default_dtype()
        dtype = saved
    return dtype


def _build_on_meta(model_class: type, config: Any, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """The model with every parameter on the meta device and its buffers computed as usual (rotary
    frequencies and other non-persistent buffers are not in checkpoints), nothing initialised."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4

    kwargs: dict[str, Any] = {"dtype" if transformers_major() >= 5 else "torch_dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False), no_init_weights():
        return model_class._from_config(config, **kwargs)


@dataclass
class _Target:
    """One tensor of the model (shared by all its names when tied) and where to put what is read."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    tensor: Tensor
    is_param: bool
    layer: nn.Module  # the module owning it under its first name


def _targets(model: nn.Module) -> dict[int, _Target]:
    targets: dict[int, _Target] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        tensors = [(a, t, True) for a, t in module._parameters.items()]
        tensors += [(a, t, False) for a, t in module._buffers.items() if a not in module._non_persistent_buffers_set]
        for attr, t, is_param in tensors:
            if t is None:
                continue
            target = targets.setdefault(id(t), _Target([], [], t, is_param, module))
            target.names.append(dot + attr)
            target.owners.append((module, attr))
    return targets


def _key_mapper(model: nn.Module, model_keys: list[str], ckpt_keys: set[str]):
    """Model key -> checkpoint key, adding or removing ``base_model_prefix`` as from_pretrained does
    (a ``LlamaModel`` checkpoint into ``LlamaForCausalLM``, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return lambda k: k
    has = any(k.startswith(prefix + ".") for k in ckpt_keys)
    expects = any(k.startswith(prefix + ".") for k in model_keys)
    if expects and not has:
        return lambda k: k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k
    if has and not expects:
        return lambda k: f"{prefix}.{k}"
    return lambda k: k


@torch.no_grad()
def _load(model: nn.Module, files: SafetensorsDir, device: torch.device) -> None:
    targets = _targets(model)
    model_keys = [n for t in targets.values() for n in t.names]
    to_ckpt = _key_mapper(model, model_keys, set(files.shape))
    # MoE blocks read their router and this rank's slices of every expert themselves (per-expert or fused keys).
    used, loaded = load_moe_blocks(model, files, to_ckpt, device)
    for target in targets.values():
        if loaded.intersection(target.names):
            continue
        key = next((to_ckpt(n) for n in target.names if to_ckpt(n) in files.shape), None)
        if key is None:
            continue  # a tied weight (tie_weights below) or a buffer kept as built; checked afterwards
        # What the owning layer says this rank holds (replicated unless it is a tensor-parallel layer).
        spec = shard_spec_of(target.layer, target.owners[0][1], target.tensor)
        value = torch.empty(spec.local_shape, dtype=target.tensor.dtype, device=device)
        files.read_into(key, value, spec)  # checks the stored shape against spec.shape
        if target.is_param:
            value = nn.Parameter(value, requires_grad=target.tensor.requires_grad)
        for module, name in target.owners:
            (module._parameters if target.is_param else module._buffers)[name] = value
        used.add(key)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    ignore.append(re.compile(r"rotary_emb\.inv_freq"))  # once saved, now computed
    unexpected = sorted(k for k in set(files.shape) - used if not any(p.search(k) for p in ignore))
    # A head the model does not have (a base model, or another head, loaded from a checkpoint with one): its
    # tensors are left out with a warning, as transformers does. Any other tensor that matches nothing is an error.
    head = _head_keys(model, set(files.shape), unexpected)
    if head:
        warnings.warn(f"{files.root}: tensors the model has no place for were not loaded: {head[:10]}", stacklevel=3)
    unplaced = [k for k in unexpected if k not in head]
    if unplaced:
        raise ValueError(
            f"{files.root}: {len(unplaced)} checkpoint tensors match nothing in {type(model).__name__}: {unplaced[:10]}"
        )


def _head_keys(model: nn.Module, ckpt_keys: set[str], keys: list[str]) -> list[str]:
    """Those of ``keys`` outside the base model (``base_model_prefix``, e.g. ``model.``) of a checkpoint that has
    one: ``lm_head.weight`` of a ``Qwen2ForCausalLM`` checkpoint loaded into ``Qwen2Model`` or a classifier."""
    inside = getattr(model, "base_model_prefix", "") + "."
    if inside == "." or not any(k.startswith(inside) for k in ckpt_keys):
        return []
    return [k for k in keys if not k.startswith(inside)]


@torch.no_grad()
def _init_missing(model: nn.Module, group: GroupLike, device: torch.device, root: Path) -> None:
    """Parameters still on the meta device (the checkpoint lacks them): transformers draws them with the model's
    ``_init_weights`` and warns; so does this, then broadcasts them from the group's rank 0, since every rank
    must hold the same replicated weights. A missing tensor-parallel shard (an MLP weight) is an error."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not missing:
        return
    owners = {n: model.get_submodule(n.rpartition(".")[0]) for n in missing}
    sharded = [n for n, m in owners.items() if shard_spec_of(m, n.rpartition(".")[2]).is_sharded]
    if sharded:
        raise ValueError(f"{root}: the checkpoint lacks {len(sharded)} MLP weights of the model: {sharded[:10]}")
    tp = resolve_group(group)
    for module in {id(m): m for m in owners.values()}.values():
        params = module._parameters
        loaded = {a: p.clone() for a, p in params.items() if p is not None and p.device.type != "meta"}
        for a, p in params.items():
            if p is not None and p.device.type == "meta":
                params[a] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        model._init_weights(module)  # it may draw every parameter of the module: put the loaded ones back
        for a, value in loaded.items():
            params[a].copy_(value)
        if tp.size > 1:
            for p in params.values():
                if p is not None:
                    dist.broadcast(p, src=dist.get_global_rank(tp.group, 0), group=tp.group)
    warnings.warn(
        f"Some weights of {type(model).__name__} were not initialized from the model checkpoint at {root} and are "
        f"newly initialized: {missing[:10]}",
        stacklevel=3,
    )


def from_pretrained(
    model_class: type,
    path: str | Path,
    group: GroupLike = None,
    *,
    strict: bool = True,
    fuse_gate_up: bool = False,
    overlap_comm: bool = True,
    comm_chunks: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` followed by :func:`parallelize_mlp` over ``group``,
    without ever holding the dense MLPs (``strict`` and the execution modes as there).

    The model is built with its parameters on the meta device (buffers such as the rotary frequencies are
    computed as usual), its MLPs replaced by tensor-parallel blocks, then each rank reads from the
    safetensors files its rows / columns of every MLP weight and the other tensors whole, a chunk at a
    time, so its peak memory is about what it keeps. ``model_class`` is a transformers model class or an
    Auto class; ``path`` a local directory with ``config.json`` and ``model.safetensors`` (or a sharded
    checkpoint with its ``model.safetensors.index.json``).

    Keyword arguments as in transformers: ``torch_dtype`` / ``dtype`` (a dtype, its name or ``"auto"``),
    ``device_map`` (one device, e.g. ``f"cuda:{local_rank}"`` or ``{"": local_rank}``),
    ``attn_implementation``, ``config``, and config overrides; anything else is an error naming it. Tied
    weights are tied, the model is returned in eval mode with its generation config. Weights the checkpoint
    lacks are drawn by the model's ``_init_weights`` with a warning, as transformers does (a new
    classification head), the same on every rank; a missing MLP weight or expert is a ``ValueError``. A
    checkpoint tensor the model has no place for is a ``ValueError`` too, except a head's the model lacks (a
    warning, as in transformers: a base model or another head loaded from a checkpoint with a head). MoE experts
    are read from per-expert keys (as checkpoints store them) or fused ones, each rank its slices only. Every
    rank of ``group`` must call it.
    """
    require_hf_extra("tp_ffn.hf.from_pretrained")
    opts = _LoadOptions.from_kwargs(kwargs)
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path: expected a local checkpoint directory, got {str(path)!r}")
    model_class, config = _resolve_class_and_config(model_class, root, opts)
    files = SafetensorsDir(root)
    dtype = _resolve_dtype(opts.dtype, config, files)
    model = _build_on_meta(model_class, config, dtype, opts.attn_implementation)
    parallelize_mlp(
        model, group, strict=strict, fuse_gate_up=fuse_gate_up, overlap_comm=overlap_comm, comm_chunks=comm_chunks
    )
    _load(model, files, opts.device)
    model.tie_weights()
    _init_missing(model, group, opts.device, root)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != opts.device:
                module._buffers[name] = buf.to(opts.device)
    model.eval()
    model.config.name_or_path = str(path)
    if model.can_generate() and (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(root))
    return model
