"""Hugging Face MLPs (``gate_proj``, ``up_proj``, ``down_proj``) replaced by tensor-parallel blocks that keep
their names, and the full state dict gathered back from them.

``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP`` and every module built the same way compute
``down_proj(act(gate_proj(x)) * up_proj(x))``: the SwiGLU block of :class:`~tp_ffn.ParallelFeedForward` with
``gate_proj = w1``, ``up_proj = w3``, ``down_proj = w2``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checkpoint import META_TO_HF
from ..ffn import ParallelFeedForward, get_activation
from ..groups import GroupLike
from ..layers import ColumnParallelLinear, RowParallelLinear
from .guard import refuse_data_parallel_over_tp_group

__all__ = ["HF_ACTIVATIONS", "LAYOUTS", "MLPLayout", "ParallelMLP", "full_state_dict", "parallelize_mlp"]

# Hugging Face's ACT2FN name -> the tp_ffn activation computing the same function with the same torch call:
# "gelu" is GELUActivation (erf, F.gelu), "gelu_pytorch_tanh" F.gelu(approximate="tanh"), "silu"/"swish" F.silu.
HF_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ParallelMLP(ParallelFeedForward):
    """:class:`~tp_ffn.ParallelFeedForward` whose layers are registered under Hugging Face's names.

    ``gate_proj`` is ``w1``, ``up_proj`` is ``w3``, ``down_proj`` is ``w2`` (the same module objects, so
    the block's forward and backward are ParallelFeedForward's). Rank r of W holds::

        gate_proj.weight, up_proj.weight  [n_r, hidden_size]    (rows [start_r, end_r) of intermediate_size)
        down_proj.weight                  [hidden_size, n_r]    (the same columns)
        gate_proj.bias, up_proj.bias      [n_r]; down_proj.bias [hidden_size], whole (added once)

    so ``state_dict()`` has the keys of the dense MLP, holding this rank's shards.
    """

    _HF_NAMES: ClassVar[dict[str, str]] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def __init__(self, hidden_size: int, intermediate_size: int, **options: Any) -> None:
        """``options``: those of :class:`~tp_ffn.ParallelFeedForward` (``bias``, ``activation``, ``group``,
        the execution modes, ``dtype``, ``device``)."""
        super().__init__(hidden_size, intermediate_size, **options)
        # Hugging Face's order (gate, up, down), so state_dict() lists the keys as the dense MLP did.
        for name in ("up_proj", "down_proj"):
            self._modules[name] = self._modules.pop(name)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size

    # ParallelFeedForward builds and reads w1/w2/w3: they are stored and found under the HF names.
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self._HF_NAMES.get(name, name), value)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(self._HF_NAMES.get(name, name))

    @property
    def w1(self) -> ColumnParallelLinear:
        return self.gate_proj

    @property
    def w2(self) -> RowParallelLinear:
        return self.down_proj

    @property
    def w3(self) -> ColumnParallelLinear:
        return self.up_proj

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """The full weights under HF names (``gate_proj.weight`` ...), the same on every rank. Collective."""
        return {f"{META_TO_HF[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in self.dense_state_dict().items()}


def activation_name(mlp: nn.Module, config: Any, path: str, attr: str = "act_fn") -> str:
    """The tp_ffn activation of ``mlp``, from the config: Gemma's ``hidden_activation`` (transformers 4),
    else ``hidden_act``. When the module has an activation module (``attr``: ``act_fn``, Phi-3's
    ``activation_fn``), the first of these it computes is taken, so the block computes what the model did;
    without a config that module alone decides."""
    cfg = getattr(mlp, "config", None)
    cfg = config if cfg is None else cfg
    if cfg is not None and getattr(cfg, "hidden_act", None) is None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # a composite model (e.g. vision + text): the MLPs are the text model's
    named = [(f"config.{a}", getattr(cfg, a)) for a in ("hidden_activation", "hidden_act") if getattr(cfg, a, None)]
    act_fn = getattr(mlp, attr, None)
    if not named:
        if act_fn is None:
            raise ValueError(f"{path}: no activation (no config.hidden_act / hidden_activation and no {attr})")
        for name in sorted(set(HF_ACTIVATIONS.values())):
            if _computes(act_fn, name):
                return name
        raise ValueError(f"{path}.{attr}: expected one of the activations {sorted(HF_ACTIVATIONS)}, got {act_fn!r}")
    for where, hf_name in named:
        name = HF_ACTIVATIONS.get(hf_name) if isinstance(hf_name, str) else None
        if name is not None and (act_fn is None or _computes(act_fn, name)):
            return name
    where, hf_name = named[0]
    if not isinstance(hf_name, str) or hf_name not in HF_ACTIVATIONS:
        raise ValueError(
            f"{where}: expected an activation tp_ffn computes exactly ({', '.join(sorted(HF_ACTIVATIONS))}), "
            f"got {hf_name!r}"
        )
    raise ValueError(f"{path}.{attr}: computes something other than {where}={hf_name!r} (got {act_fn!r})")


def _computes(act_fn: Any, name: str) -> bool:
    """Whether ``act_fn`` gives bit for bit what tp_ffn's ``name`` gives, on a float64 probe."""
    probe = torch.linspace(-8.0, 8.0, 1001, dtype=torch.float64)
    try:
        with torch.no_grad():
            return torch.equal(act_fn(probe), get_activation(name)(probe))
    except Exception:  # noqa: BLE001 - an act_fn that cannot take the probe is not a match
        return False


def _is_hf_mlp(module: nn.Module) -> bool:
    children = module._modules
    return all(type(children.get(n)) is nn.Linear for n in _PROJECTIONS)


def is_dtensor(t: object) -> bool:
    # Duck-typed: DTensor's public home is torch.distributed.tensor from torch 2.5 on (the package's
    # minimum is 2.4), and what matters here is only that it is sharded and can be made whole.
    return isinstance(t, Tensor) and hasattr(t, "placements") and hasattr(t, "full_tensor")


def check_full_weights(mlp: nn.Module, path: str, names: Iterable[str]) -> None:
    """``ValueError`` when a projection's weight is a DTensor (already sharded by a ``tp_plan``)."""
    for n in names:
        if is_dtensor(mlp._modules[n].weight):
            raise ValueError(
                f"{path}.{n}.weight: expected a full tensor, got a DTensor (sharded by a tensor-parallel plan such as "
                "Hugging Face's tp_plan): leave the MLPs out of that plan and let tp_ffn shard them"
            )


def _check_mlp(mlp: nn.Module, path: str) -> tuple[int, int, bool]:
    """``(hidden_size, intermediate_size, bias)`` of an HF MLP; ``ValueError`` naming what does not fit."""
    gate, up, down = (mlp._modules[n] for n in _PROJECTIONS)
    check_full_weights(mlp, path, _PROJECTIONS)
    intermediate, hidden = gate.weight.shape
    expected = {
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    for n, layer in zip(_PROJECTIONS, (gate, up, down)):
        if tuple(layer.weight.shape) != expected[n]:
            raise ValueError(
                f"{path}.{n}.weight: expected shape {expected[n]} (from gate_proj), got {tuple(layer.weight.shape)}"
            )
    biases = [layer.bias is not None for layer in (gate, up, down)]
    if len(set(biases)) > 1:
        raise ValueError(f"{path}: expected biases on all of gate_proj/up_proj/down_proj or on none, got {biases}")
    return hidden, intermediate, biases[0]


@dataclass(frozen=True)
class BuildOptions:
    """What every replaced block is built with (the keyword arguments of :func:`parallelize_mlp`)."""

    group: GroupLike
    fuse_gate_up: bool
    overlap_comm: bool
    comm_chunks: int


@dataclass(frozen=True)
class MLPLayout:
    """A dense MLP layout :func:`parallelize_mlp` replaces, and the block that replaces it.

    ``matches(module)`` says whether a module has the layout; ``prepare(module, config, path)`` checks it
    (``ValueError`` naming what does not fit, nothing changed yet) and returns a function that builds the
    tensor-parallel block from it with the :class:`BuildOptions`. ``projections`` and ``families`` are
    listed in docs/huggingface-support.md.
    """

    projections: str
    families: str
    parallel_class: type[nn.Module]
    matches: Callable[[nn.Module], bool]
    prepare: Callable[[nn.Module, Any, str], Callable[[BuildOptions], nn.Module]]


def _prepare_gate_up_down(mlp: nn.Module, config: Any, path: str) -> Callable[[BuildOptions], nn.Module]:
    hidden, intermediate, bias = _check_mlp(mlp, path)
    activation = activation_name(mlp, config, path)
    return lambda opts: _build(mlp, hidden, intermediate, bias, activation, opts)


# Every layout parallelize_mlp replaces; adapters of other layouts (phi3.py) add theirs on import.
LAYOUTS: list[MLPLayout] = [
    MLPLayout(
        projections="gate_proj, up_proj, down_proj (nn.Linear, biases on all or none)",
        families="Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, OLMo 1-3, Granite, Cohere, StableLM, and every MLP "
        "computing down_proj(act(gate_proj(x)) * up_proj(x))",
        parallel_class=ParallelMLP,
        matches=_is_hf_mlp,
        prepare=_prepare_gate_up_down,
    )
]

# Children or parameters by which a module shows itself as a gated MLP (gate and up projections): Llama's
# gate_proj, Phi-3's / GLM's / MoE experts' fused gate_up_proj, Mixtral's and tp_ffn's w1/w3, T5's wi_0/wi_1.
_GATED_NAMES = ({"gate_proj"}, {"gate_up_proj"}, {"w1", "w3"}, {"wi_0", "wi_1"})


def _looks_gated(module: nn.Module) -> bool:
    names = set(module._modules) | set(module._parameters)
    return any(group <= names for group in _GATED_NAMES)


def _describe(module: nn.Module) -> str:
    """``ClassName: gate_proj=Linear4bit, up_proj=..., down_proj=...`` (what the module holds)."""
    parts = [f"{n}={type(m).__name__}" for n, m in module._modules.items() if m is not None][:6]
    parts += [f"{n}=Parameter{tuple(p.shape)}" for n, p in module._parameters.items() if p is not None][:4]
    return f"{type(module).__name__} ({', '.join(parts)})"


def supported_layouts() -> str:
    return "; ".join(layout.projections for layout in LAYOUTS)


def parallelize_mlp(
    model: nn.Module,
    group: GroupLike = None,
    *,
    strict: bool = True,
    fuse_gate_up: bool = False,
    overlap_comm: bool = True,
    comm_chunks: int = 1,
) -> int:
    """Replace, in place, every MLP of ``model`` of a supported layout by its tensor-parallel block over
    ``group`` holding this rank's slices of its weights. Returns the number of blocks replaced.

    Layouts (:data:`LAYOUTS`, docs/huggingface-support.md): a submodule whose children ``gate_proj``,
    ``up_proj`` and ``down_proj`` are ``nn.Linear`` becomes a :class:`ParallelMLP`; Phi-3's ``Phi3MLP`` (fused
    ``gate_up_proj``) a :class:`~tp_ffn.hf.phi3.Phi3ParallelMLP`.

    Nothing is skipped silently. With ``strict=True`` (the default) a ``ValueError`` names the first gated MLP
    no layout takes (Mixtral's ``w1``/``w3`` experts, a ``gate_proj`` that is not a plain ``nn.Linear``, a
    fused ``gate_up_proj`` of another model) and, when nothing is replaced, the model's class; nothing is
    changed then. With ``strict=False`` those are left dense with one warning, and the count is returned.
    Blocks that are already tensor-parallel are left as they are (a second call returns 0 without error).

    Each rank copies only its slices (a model on the ``meta`` device stays there, to be loaded later).
    Parameter names, dtype, device, ``requires_grad`` and train/eval mode are kept, so ``model.state_dict()``
    has the keys it had. The activation comes from the config (``hidden_activation`` for Gemma, else
    ``hidden_act``): ``silu``/``swish``, ``gelu`` (erf), ``gelu_pytorch_tanh``, ``relu``; anything else is a
    ``ValueError``. Rules of a Hugging Face ``tp_plan`` that name the replaced layers are dropped from the
    model's plans, so a later ``tp_plan`` pass cannot shard them a second time. Hooks registered on the
    replaced modules are not carried over. Each block refuses to run inside a ``DistributedDataParallel``
    spanning ranks of its tensor-parallel group (see :func:`~tp_ffn.hf.prepare_trainer`). Every rank of
    ``group`` must call it on the same model.
    """
    config = getattr(model, "config", None)
    parallel = tuple(layout.parallel_class for layout in LAYOUTS) + (ParallelFeedForward,)
    inside_parallel: set[int] = set()
    found: dict[int, tuple[nn.Module, list[str], MLPLayout]] = {}
    unsupported: list[tuple[str, nn.Module]] = []
    already = 0
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside_parallel:
            continue
        if isinstance(module, parallel):
            already += 1
            inside_parallel.update(id(m) for m in module.modules())
            continue
        layout = next((lay for lay in LAYOUTS if lay.matches(module)), None)
        if layout is not None:
            found.setdefault(id(module), (module, [], layout))[1].append(path)
        elif _looks_gated(module) and id(module) not in {id(m) for _, m in unsupported}:
            unsupported.append((path, module))
    skipped = ""
    if unsupported:
        path, module = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        skipped = (
            f"{path or 'model'}: a gated MLP tp_ffn.hf cannot parallelize, {_describe(module)}{more}; "
            f"supported layouts: {supported_layouts()}"
        )
        if strict:
            raise ValueError(f"{skipped} (strict=False leaves it dense)")
    if not found and not already:
        nothing = (
            f"model: {type(model).__name__} has no MLP tp_ffn.hf can parallelize (supported layouts: "
            f"{supported_layouts()})"
        )
        if strict:
            raise ValueError(f"{nothing}; strict=False returns 0 instead")
        skipped = skipped or nothing
    # Everything is checked before anything is replaced, so a bad model is left as it was.
    plans = []
    for mlp, paths, layout in found.values():
        if "" in paths:
            raise ValueError("model: is itself such an MLP; pass the model that holds it")
        plans.append((paths, layout.prepare(mlp, config, paths[0])))
    if skipped:
        warnings.warn(f"parallelize_mlp (strict=False): left dense: {skipped}", stacklevel=2)
    opts = BuildOptions(group, fuse_gate_up, overlap_comm, comm_chunks)
    for paths, build in plans:
        block = build(opts)
        block.register_forward_pre_hook(refuse_data_parallel_over_tp_group)
        for path in paths:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, block)
    _drop_plan_rules(model, [p for paths, _ in plans for p in paths])
    return len(plans)


def _build(
    mlp: nn.Module, hidden: int, intermediate: int, bias: bool, activation: str, opts: BuildOptions
) -> ParallelMLP:
    weight = mlp.gate_proj.weight
    block = ParallelMLP(
        hidden, intermediate, bias=bias, activation=activation, group=opts.group, fuse_gate_up=opts.fuse_gate_up,
        overlap_comm=opts.overlap_comm, comm_chunks=opts.comm_chunks, dtype=weight.dtype, device="meta",
    )  # fmt: skip
    if weight.device.type != "meta":
        block.load_dense_state_dict(
            {f"{n}.{k}": v for n in _PROJECTIONS for k, v in mlp._modules[n].state_dict().items()},
            device=weight.device,
        )
    copy_module_state(mlp, block, _PROJECTIONS)
    return block


def copy_module_state(mlp: nn.Module, block: nn.Module, projections: Iterable[str]) -> None:
    """What the replaced MLP carried besides its weights: ``requires_grad`` of each parameter, its ``config``
    (HF code may read it, as from the dense MLP) and train/eval mode."""
    for n in projections:
        for k, p in mlp._modules[n].named_parameters():
            getattr(block._modules[n], k).requires_grad_(p.requires_grad)
    if "config" in mlp.__dict__:
        block.config = mlp.config
    block.train(mlp.training)


def _plan_rule_matches(rule: str, name: str) -> bool:
    """Hugging Face plan keys are module paths with ``*`` for a layer index (``layers.*.mlp.gate_proj``)."""
    pattern = "[^.]+".join(re.escape(part) for part in rule.split("*"))
    return re.fullmatch(pattern, name) is not None


def _drop_plan_rules(model: nn.Module, paths: Iterable[str]) -> None:
    """Remove the rules of every ``_tp_plan`` (transformers >= 4.47) that name a replaced MLP or its layers."""
    paths = list(paths)
    for prefix, module in model.named_modules():
        plan = module.__dict__.get("_tp_plan")  # instance plans only: the class-level ones are shared
        if not isinstance(plan, dict) or not plan:
            continue
        names = set()
        for path in paths:
            if prefix and not path.startswith(prefix + "."):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            names.add(rel)
            names.update(f"{rel}.{n}{s}" for n in _PROJECTIONS for s in ("", ".weight", ".bias"))
        for rule in [r for r in plan if any(_plan_rule_matches(r, n) for n in names)]:
            del plan[rule]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every tensor-parallel block gathered to its full tensors (and any DTensor
    made whole), under the same keys, identical on every rank.

    Collective: every rank of every block's group must call it. Use it to save a normal checkpoint::

        sd = tp_ffn.hf.full_state_dict(model)
        if rank == 0:
            model.save_pretrained(path, state_dict=sd)
    """
    out = model.state_dict()
    gathered: dict[int, dict[str, Tensor]] = {}
    hf_blocks = tuple(layout.parallel_class for layout in LAYOUTS)
    for path, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, (*hf_blocks, ParallelFeedForward)):
            continue
        if id(module) not in gathered:
            if isinstance(module, hf_blocks):
                gathered[id(module)] = module.full_state_dict()
            else:
                gathered[id(module)] = module.dense_state_dict()
        prefix = f"{path}." if path else ""
        for key, value in gathered[id(module)].items():
            out[prefix + key] = value
    for key, value in out.items():
        if is_dtensor(value):
            out[key] = value.full_tensor()
    return out
