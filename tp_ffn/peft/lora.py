"""PEFT's LoRA layers for tp_ffn's parallel projections, and what PEFT is taught so that it uses them.

``LoraColumnParallelLinear`` / ``LoraRowParallelLinear`` are PEFT LoRA layers (subclasses of PEFT's own
``lora.Linear``) around a :class:`~tp_ffn.ColumnParallelLinear` / :class:`~tp_ffn.RowParallelLinear` in a slot
of a :class:`~tp_ffn.ParallelFeedForward`. Rank r of W holds, per adapter::

    column (gate_proj / up_proj, w1 / w3):  lora_A [r, dim] whole        lora_B [n_r, r] rows [start_r, end_r)
    row    (down_proj, w2):                  lora_A [r, n_r] columns      lora_B [dim, r] whole

PEFT draws the factors as for the dense layer (the same numbers from the same generator state, so the dense
model and the parallel one get the same adapter from the same seed) and each rank keeps its slice; the whole
factors are then broadcast from the group's first rank, so that they agree whatever the generators did. A dense
adapter loads onto them (each rank takes its slice of a full-shape tensor; a tensor of this rank's shape loads as
it is) and ``gather_shards()`` gives the full tensors back for :func:`tp_ffn.hf.full_state_dict`. Merging adds
``B A`` to this rank's shard of the weight: ``merge_and_unload()`` gives the parallel model, merged. The block
applies the terms in its own forward (``low_rank_terms()``); the layers' own forward is never called and refuses
to run alone.

What PEFT is taught (:func:`install`, once): ``LoraModel.inject_adapter`` registers these classes for a model
holding parallel blocks through PEFT's own ``LoraConfig._register_custom_module``, adds the blocks' projections
to ``target_modules="all-linear"`` (PEFT picks only ``nn.Linear`` there), and refuses what these layers cannot
do (one line naming the option). ``PeftModel.save_pretrained`` refuses to write this rank's shards as if they
were an adapter: without ``state_dict=tp_ffn.hf.full_state_dict(model)`` (collective, so it cannot be done
inside ``save_pretrained``, which is often called on one rank only), or with a state dict holding the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import all_gather_shard
from ..ffn import ParallelFeedForward
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..lowrank import LowRank, parallel_layer
from ..sharding import ShardSpec

try:
    _PEFT = tuple(int(p) for p in re.findall(r"\d+", version("peft"))[:2])
except PackageNotFoundError:
    raise ImportError("tp_ffn.peft needs peft>=0.21, which is not installed: pip install 'tp-ffn[peft]'") from None
if _PEFT < (0, 21):
    raise ImportError(f"tp_ffn.peft needs peft>=0.21 (pip install 'tp-ffn[peft]'), found peft {version('peft')}")

from peft import LoraConfig, PeftModel  # noqa: E402
from peft.tuners.lora import LoraModel  # noqa: E402
from peft.tuners.lora.layer import Linear as _PeftLoraLinear  # noqa: E402
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists  # noqa: E402

__all__ = ["LoraColumnParallelLinear", "LoraRowParallelLinear", "install"]

# init_lora_weights these layers take: PEFT's default draw, "gaussian", or PEFT's nn.Linear draws (False).
# The others (PiSSA, OLoRA, CorDA, LoftQ, EVA, orthogonal, LoRA-GA, MiCA) decompose the full base weight.
_INITS = (True, False, "gaussian")


def _check_config(config: LoraConfig, where: str) -> None:
    """``ValueError`` naming the first option of ``config`` these layers do not implement."""
    variants = [
        f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)
    ]
    bad = None
    if variants:
        bad = f"{variants[0]}={getattr(config, variants[0])!r} (a LoRA variant)"
    elif config.lora_bias:
        bad = "lora_bias=True"
    elif config.fan_in_fan_out:
        bad = "fan_in_fan_out=True"
    elif not (isinstance(config.init_lora_weights, bool) or config.init_lora_weights == "gaussian"):
        bad = f"init_lora_weights={config.init_lora_weights!r} (it needs the full base weight)"
    if bad:
        raise ValueError(
            f"LoraConfig: {bad} is not supported on tp_ffn's tensor-parallel {where}; supported: plain LoRA with "
            f"init_lora_weights in {list(_INITS)}, lora_dropout, lora_alpha, use_rslora, rank/alpha patterns"
        )


class _ParallelLora(_PeftLoraLinear):
    """What both layers share. ``_sharded``: the factor split with the projection (``"lora_B"`` for a column-,
    ``"lora_A"`` for a row-parallel layer), ``_dim`` its split dimension; the other factor is whole."""

    _sharded: ClassVar[str]
    _whole: ClassVar[str]
    _dim: ClassVar[int]

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # The dense layer's sizes: PEFT draws the full factors, as for the dense model, and update_layer slices.
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _check_config(config, type(self.get_base_layer()).__name__)
        if kwargs.get("tied_adapter") or kwargs.get("parameter_name") is not None:
            raise ValueError(f"{kwargs.get('target_name', '')}: tied or parameter-targeted LoRA is not supported here")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        layer: ColumnParallelLinear | RowParallelLinear = self.get_base_layer()
        holder: nn.Linear = getattr(self, self._sharded)[adapter_name]
        w = holder.weight
        spec = self._factor_spec(layer, w.shape)
        holder.weight = nn.Parameter(spec.take(w.detach(), copy=True), requires_grad=w.requires_grad)
        setattr(holder, "out_features" if self._dim == 0 else "in_features", spec.local_size)
        whole = getattr(self, self._whole)[adapter_name].weight
        if layer.tp.size > 1 and whole.device.type != "meta":
            with torch.no_grad():
                dist.broadcast(whole, src=dist.get_global_rank(layer.tp.group, 0), group=layer.tp.group)

    def low_rank_terms(self) -> tuple[LowRank, ...]:
        """The adapters that apply now, as PEFT's ``lora.Linear.forward`` decides (none while disabled or merged;
        disabling a merged layer unmerges it)."""
        if self._forward_pre_hooks or self._forward_hooks:
            raise RuntimeError(
                f"{type(self).__name__}: forward hooks on a tensor-parallel projection never run (its block reads the "
                "weights and applies the adapters itself), so PEFT's per-call options (adapter_names=...) and "
                "other hooks are not supported here"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return ()
        if self.merged:
            return ()
        terms = []
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            drop = self.lora_dropout[name]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            terms.append(LowRank(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p))
        return tuple(terms)

    def _factor_spec(self, layer: ColumnParallelLinear | RowParallelLinear, full_shape: Sequence[int]) -> ShardSpec:
        """The sharded factor (full shape ``full_shape``) is cut along ``_dim`` as the base layer's weight is."""
        w = layer.shard_spec("weight")
        return ShardSpec.split(full_shape, self._dim, w.rank, w.world, w.parts)

    def sharded_factors(self) -> list[tuple[nn.Parameter, ShardSpec, dist.ProcessGroup | None]]:
        """``(factor, its ShardSpec, the group it is split over)`` per adapter, for the sharded factor. It lives in
        PEFT's plain ``nn.Linear`` holder, which says nothing of its sharding: this layer says it, for
        :func:`tp_ffn.hf.full_state_dict` (through :meth:`gather_shards`) and :func:`tp_ffn.hf.clip_grad_norm_`."""
        layer = self.get_base_layer()
        out = []
        for holder in getattr(self, self._sharded).values():
            w = holder.weight
            full_shape = list(w.shape)
            full_shape[self._dim] = layer.out_features if self._dim == 0 else layer.in_features
            out.append((w, self._factor_spec(layer, full_shape), layer.tp.group))
        return out

    @torch.no_grad()
    def gather_shards(self) -> list[tuple[Tensor, Tensor]]:
        """``(this rank's factor, the full factor)`` per adapter, for :func:`tp_ffn.hf.full_state_dict`.
        Collective over the layer's group."""
        return [(w, all_gather_shard(w.detach(), spec, group).clone()) for w, spec, group in self.sharded_factors()]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A dense adapter holds the full factor: keep this rank's slice. (The children load after this.)
        layer = self.get_base_layer()
        full = layer.out_features if self._dim == 0 else layer.in_features
        for name in getattr(self, self._sharded):
            key = f"{prefix}{self._sharded}.{name}.weight"
            t = state_dict.get(key)
            if isinstance(t, Tensor) and t.dim() == 2 and t.shape[self._dim] == full and layer.tp.size > 1:
                state_dict[key] = self._factor_spec(layer, t.shape).take(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError(
            f"{type(self).__name__}: LoRA on a tensor-parallel layer runs inside its ParallelFeedForward / ParallelMLP, "
            "whose forward applies it; this layer was called on its own"
        )

    def __repr__(self) -> str:
        return "tp_ffn." + super().__repr__()


class LoraColumnParallelLinear(_ParallelLora):
    """PEFT LoRA on a column-parallel projection: ``lora_A [r, in]`` whole, ``lora_B [n_r, r]`` this rank's rows."""

    _sharded, _whole, _dim = "lora_B", "lora_A", 0


class LoraRowParallelLinear(_ParallelLora):
    """PEFT LoRA on a row-parallel projection: ``lora_A [r, n_r]`` this rank's columns, ``lora_B [out, r]`` whole."""

    _sharded, _whole, _dim = "lora_A", "lora_B", 1


_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    ColumnParallelLinear: LoraColumnParallelLinear,
    RowParallelLinear: LoraRowParallelLinear,
}


def _parallel_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(slots, loose)``: the paths of the blocks' projection slots, and of parallel layers outside any block."""
    slots, inside = [], set()
    for path, module in model.named_modules():
        if isinstance(module, ParallelFeedForward):
            for name, child in module.named_children():
                try:
                    inside.add(id(parallel_layer(child)))
                except TypeError:
                    continue
                slots.append(f"{path}.{name}" if path else name)
    loose = [
        path
        for path, m in model.named_modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and id(m) not in inside
    ]
    return slots, loose


def _prepare(config: Any, model: nn.Module) -> None:
    """Before PEFT injects ``config`` into ``model``: register the layers, widen "all-linear", check options."""
    if not isinstance(config, LoraConfig):
        return
    slots, loose = _parallel_layers(model)
    if not slots and not loose:
        return
    config._register_custom_module(_LAYERS)
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        _maybe_include_all_linear_layers(config, model)  # PEFT's rule: a set of names of its nn.Linear layers
        config.target_modules = set(config.target_modules) | set(slots)
        if loose:
            warnings.warn(
                f"target_modules='all-linear': {len(loose)} tensor-parallel layers outside a ParallelFeedForward get "
                f"no LoRA (it runs inside the blocks only), e.g. {loose[0]}",
                stacklevel=4,
            )
    targeted_loose = [p for p in loose if check_target_module_exists(config, p)]
    if targeted_loose:
        raise ValueError(
            f"target_modules: {targeted_loose[0]} is a tensor-parallel layer outside a ParallelFeedForward; tp_ffn's "
            "LoRA runs inside the blocks only"
        )
    if any(check_target_module_exists(config, p) for p in slots):
        _check_config(config, "MLP")


def _sharded_factors(model: nn.Module) -> list[Tensor]:
    return [
        holder.weight
        for m in model.modules()
        if isinstance(m, _ParallelLora) and m.get_base_layer().tp.size > 1
        for holder in getattr(m, m._sharded).values()
    ]


def _check_save(model: nn.Module, state_dict: dict[str, Any] | None) -> None:
    """``ValueError`` where ``save_pretrained`` would write this rank's shards as the adapter."""
    shards = _sharded_factors(model)
    if not shards:
        return
    fix = "pass state_dict=tp_ffn.hf.full_state_dict(model) (called on every rank; save on one)"
    if state_dict is None:
        raise ValueError(
            f"save_pretrained: the LoRA factors of the tensor-parallel MLPs are sharded over the ranks; {fix}"
        )
    ptrs = {w.untyped_storage().data_ptr() for w in shards if w.device.type != "meta"}
    for key, value in state_dict.items():
        if isinstance(value, Tensor) and value.device.type != "meta" and value.untyped_storage().data_ptr() in ptrs:
            raise ValueError(f"save_pretrained: state_dict[{key!r}] is this rank's shard, not the full tensor; {fix}")


def install() -> None:
    """Teach PEFT about tp_ffn's parallel blocks (see the module docstring). Idempotent."""
    if getattr(LoraModel.inject_adapter, "_tp_ffn", False):
        return
    inject = LoraModel.inject_adapter
    save = PeftModel.save_pretrained

    @functools.wraps(inject)
    def inject_adapter(self: LoraModel, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        _prepare(self.peft_config[adapter_name], model)
        return inject(self, model, adapter_name, *args, **kwargs)

    @functools.wraps(save)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        _check_save(self, kwargs.get("state_dict"))
        return save(self, save_directory, *args, **kwargs)

    inject_adapter._tp_ffn = True  # type: ignore[attr-defined]
    LoraModel.inject_adapter = inject_adapter  # type: ignore[method-assign]
    PeftModel.save_pretrained = save_pretrained  # type: ignore[method-assign]
