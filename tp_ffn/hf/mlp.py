"""Hugging Face MLPs (``gate_proj``, ``up_proj``, ``down_proj``) replaced by tensor-parallel blocks that keep
their names, and the full state dict gathered back from them.

``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP`` and every module built the same way compute
``down_proj(act(gate_proj(x)) * up_proj(x))``: the SwiGLU block of :class:`~tp_ffn.ParallelFeedForward` with
``gate_proj = w1``, ``up_proj = w3``, ``down_proj = w2``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checkpoint import META_TO_HF
from ..comm import all_gather_shard
from ..ffn import ParallelFeedForward, get_activation
from ..groups import GroupLike
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..moe import ParallelMoEFeedForward
from ..sharding import shard_spec_of
from .guard import guard

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

_PROJECTIONS = (META_TO_HF["w1"], META_TO_HF["w3"], META_TO_HF["w2"])  # gate, up, down: Hugging Face's order


class ParallelMLP(ParallelFeedForward):
    """:class:`~tp_ffn.ParallelFeedForward` whose layers are registered under Hugging Face's names.

    ``gate_proj`` is ``w1``, ``up_proj`` is ``w3``, ``down_proj`` is ``w2`` (the same module objects, so
    the block's forward and backward are ParallelFeedForward's). Rank r of W holds::

        gate_proj.weight, up_proj.weight  [n_r, hidden_size]    (rows [start_r, end_r) of intermediate_size)
        down_proj.weight                  [hidden_size, n_r]    (the same columns)
        gate_proj.bias, up_proj.bias      [n_r]; down_proj.bias [hidden_size], whole (added once)

    so ``state_dict()`` has the keys of the dense MLP, holding this rank's shards.
    """

    _HF_NAMES: ClassVar[dict[str, str]] = META_TO_HF

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

    ``matches(module)`` says whether a module has the layout; a matched module is claimed whole (nothing
    inside it is taken as an MLP of its own, or flagged as an unsupported one: an MoE block's experts).
    ``prepare(module, config, path)`` checks it (``ValueError`` naming what does not fit, nothing changed
    yet) and returns a function that builds the tensor-parallel block from it with the
    :class:`BuildOptions`, or a string saying why this layout refuses it (an error with ``strict=True``,
    left dense with a warning otherwise). ``projections`` and ``families`` are listed in
    docs/huggingface-support.md.
    """

    projections: str
    families: str
    parallel_class: type[nn.Module]
    matches: Callable[[nn.Module], bool]
    prepare: Callable[[nn.Module, Any, str], Callable[[BuildOptions], nn.Module] | str]
    what: str = "an MLP"  # in "model: is itself such an MLP"


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


def _peft_layers(module: nn.Module, path: str) -> list[str]:
    """``path (class)`` of each child of ``module`` that is a PEFT tuner layer (``get_peft_model`` called on the
    dense model). PEFT is looked up only where it is already imported: a model holding its layers has imported it.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    base = getattr(tuners, "BaseTunerLayer", None)
    if base is None:
        return []
    return [
        f"{f'{path}.{n}' if path else n} ({type(m).__module__}.{type(m).__name__})"
        for n, m in module._modules.items()
        if isinstance(m, base)
    ]


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
    ``gate_up_proj``) a :class:`~tp_ffn.hf.phi3.Phi3ParallelMLP`; every mixture-of-experts block of Mixtral,
    Qwen2-MoE, Qwen3-MoE and OLMoE (transformers 4.46 and 5.x) one :class:`~tp_ffn.hf.moe.ParallelSparseMoeBlock`
    (its experts and shared expert inside it, one all-reduce per layer).

    Nothing is skipped silently. With ``strict=True`` (the default) a ``ValueError`` names the first module
    a layout refuses (an MoE block of another family or routing, router jitter, expert biases) or the first
    gated MLP no layout takes (a ``gate_proj`` that is not a plain ``nn.Linear``, a fused ``gate_up_proj`` of
    another model, a projection PEFT has already wrapped: ``get_peft_model`` called before this function) and,
    when nothing is replaced, the model's class; nothing is changed then. With
    ``strict=False`` those are left dense (a refused MoE block whole, its experts too) with one warning, and
    the count is returned.
    Blocks that are already tensor-parallel are left as they are (a second call returns 0 without error).

    Each rank copies only its slices (a model on the ``meta`` device stays there, to be loaded later).
    Parameter names, dtype, device, ``requires_grad`` and train/eval mode are kept, so ``model.state_dict()``
    has the keys it had. The activation comes from the config (``hidden_activation`` for Gemma, else
    ``hidden_act``): ``silu``/``swish``, ``gelu`` (erf), ``gelu_pytorch_tanh``, ``relu``; anything else is a
    ``ValueError``. Rules of a Hugging Face ``tp_plan`` that name the replaced layers are dropped from the
    model's plans, so a later ``tp_plan`` pass cannot shard them a second time. Hooks registered on the
    replaced modules are not carried over. Each block refuses to run inside a ``DistributedDataParallel``
    spanning ranks of its tensor-parallel group (see :func:`~tp_ffn.hf.prepare_trainer`). Every rank of
    ``group`` must call it on the same model. Where PEFT is installed, :mod:`tp_ffn.peft` is imported, so that
    ``peft.get_peft_model`` can put LoRA on the blocks.
    """
    config = getattr(model, "config", None)
    parallel = (*(layout.parallel_class for layout in LAYOUTS), ParallelFeedForward, ParallelMoEFeedForward)
    claimed: set[int] = set()  # modules inside a parallel block or inside a module a layout matched
    found: dict[int, tuple[nn.Module, list[str], MLPLayout]] = {}
    unsupported: list[tuple[str, nn.Module]] = []
    adapted: list[str] = []  # projections PEFT wrapped before this call
    already = 0
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in found:
            found[id(module)][1].append(path)
            continue
        if id(module) in claimed:
            continue
        if isinstance(module, parallel):
            already += 1
            claimed.update(id(m) for m in module.modules())
            continue
        layout = next((lay for lay in LAYOUTS if lay.matches(module)), None)
        if layout is not None:
            found[id(module)] = (module, [path], layout)
            claimed.update(id(m) for m in module.modules())
        elif _looks_gated(module) and id(module) not in {id(m) for _, m in unsupported}:
            peft_layers = _peft_layers(module, path)
            if peft_layers:
                adapted.extend(peft_layers)
                claimed.update(id(m) for m in module.modules())
            else:
                unsupported.append((path, module))
    # Everything is checked before anything is replaced, so a bad model is left as it was.
    plans: list[tuple[list[str], Callable[[BuildOptions], nn.Module]]] = []
    refused: list[str] = []
    for mlp, paths, layout in found.values():
        if "" in paths:
            raise ValueError(f"model: is itself such {layout.what}; pass the model that holds it")
        plan = layout.prepare(mlp, config, paths[0])
        if isinstance(plan, str):
            refused.append(f"{paths[0]}: {plan}")
        else:
            plans.append((paths, plan))
    if refused and strict:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ValueError(f"{refused[0]}{more} (strict=False leaves it dense)")
    skipped = list(refused)
    if adapted:
        more = f" (and {len(adapted) - 1} more)" if len(adapted) > 1 else ""
        wrapped = (
            f"{adapted[0]}: a PEFT adapter layer on a dense MLP{more}; call tp_ffn.hf.parallelize_mlp (or "
            "tp_ffn.hf.from_pretrained) first, then get_peft_model"
        )
        if strict:
            raise ValueError(f"{wrapped} (strict=False leaves it dense)")
        skipped.append(wrapped)
    if unsupported:
        path, module = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        gated = (
            f"{path or 'model'}: a gated MLP tp_ffn.hf cannot parallelize, {_describe(module)}{more}; "
            f"supported layouts: {supported_layouts()}"
        )
        if strict:
            raise ValueError(f"{gated} (strict=False leaves it dense)")
        skipped.append(gated)
    if not found and not already:
        nothing = (
            f"model: {type(model).__name__} has no MLP tp_ffn.hf can parallelize (supported layouts: "
            f"{supported_layouts()})"
        )
        if strict:
            raise ValueError(f"{nothing}; strict=False returns 0 instead")
        skipped = skipped or [nothing]
    if skipped:
        warnings.warn(f"parallelize_mlp (strict=False): left dense: {'; '.join(skipped)}", stacklevel=2)
    opts = BuildOptions(group, fuse_gate_up, overlap_comm, comm_chunks)
    built = [(paths, build(opts)) for paths, build in plans]
    for paths, block in built:
        guard(block)
        for path in paths:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, block)
    _drop_plan_rules(model, [p for paths, _ in built for p in paths])
    _teach_peft()
    return len(built)


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


def _plan_rule_matches(rule: str, name: str, *, inside: bool = False) -> bool:
    """Hugging Face plan keys are module paths with ``*`` for a layer index (``layers.*.mlp.gate_proj``).
    ``inside``: the rule names ``name`` or anything under it."""
    if inside:  # the rule's first atoms, as many as the name has, name it
        atoms, depth = rule.split("."), name.count(".") + 1
        return len(atoms) >= depth and _plan_rule_matches(".".join(atoms[:depth]), name)
    pattern = "[^.]+".join(re.escape(part) for part in rule.split("*"))
    return re.fullmatch(pattern, name) is not None


def _drop_plan_rules(model: nn.Module, paths: Iterable[str]) -> None:
    """Remove the rules of every ``_tp_plan`` (transformers >= 4.47) and ``_ep_plan`` (expert parallelism, 5.x)
    that name a replaced block or anything inside it (its layers, an MoE block's experts)."""
    paths = list(paths)
    for prefix, module in model.named_modules():
        for attr in ("_tp_plan", "_ep_plan"):
            plan = module.__dict__.get(attr)  # instance plans only: the class-level ones are shared
            if not isinstance(plan, dict) or not plan:
                continue
            names = [p[len(prefix) + 1 :] if prefix else p for p in paths if not prefix or p.startswith(prefix + ".")]
            for rule in [r for r in plan if any(_plan_rule_matches(r, n, inside=True) for n in names)]:
                del plan[rule]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every tensor-parallel shard gathered to its full tensor (and any DTensor
    made whole), under the same keys, identical on every rank.

    Shards are found by what holds them: every module with a ``gather_shards()`` method (the parallel blocks,
    and the LoRA layers of :mod:`tp_ffn.peft`) gives each of its local parameters with the full tensor, which
    replaces that parameter under every key it has, however it is wrapped (a PEFT model's
    ``...mlp.gate_proj.base_layer.weight`` included).

    Collective: every rank of every block's group must call it. Use it to save a normal checkpoint::

        sd = tp_ffn.hf.full_state_dict(model)
        if rank == 0:
            model.save_pretrained(path, state_dict=sd)
    """
    local = model.state_dict()
    # MoE blocks: their full keys (HF's per-expert or fused layout) differ from their local ones
    # (stacked experts), so each block gives its full tensors under its own keys.
    moe: dict[str, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        if isinstance(module, ParallelMoEFeedForward) and _under(prefix, moe) is None:
            moe[prefix] = module
    moe_full: dict[int, dict[str, Tensor]] = {}
    for module in moe.values():
        if id(module) not in moe_full:
            full = getattr(module, "full_state_dict", None)
            moe_full[id(module)] = full() if full is not None else module.dense_state_dict()
    # Every other parameter: modules that gather their own (a block, LoRA factors whose keys PEFT renames),
    # then every parameter whose layer says it is sharded; in module order on every rank, so the
    # all-gathers pair up.
    keys: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        keys.setdefault(id(value), []).append(key)
    outside = [m for path, m in model.named_modules() if _under(f"{path}." if path else "", moe) is None]
    gathered: dict[int, Tensor] = {}
    for module in outside:
        gather = getattr(module, "gather_shards", None)
        if callable(gather):
            gathered.update((id(local_), full) for local_, full in gather())
    for module in outside:
        for attr, p in module._parameters.items():
            if p is None or id(p) in gathered or id(p) not in keys:
                continue
            spec = shard_spec_of(module, attr, p)
            if spec.is_sharded:
                gathered[id(p)] = all_gather_shard(p.detach(), spec, module.tp.group).clone()
    full_of = {key: full for ident, full in gathered.items() for key in keys.get(ident, ())}
    out: dict[str, Tensor] = {}
    placed: set[str] = set()
    for key, value in local.items():
        prefix = _under(key, moe)
        if prefix is None:
            value = full_of.get(key, value)
            out[key] = value.full_tensor() if is_dtensor(value) else value
        elif prefix not in placed:
            placed.add(prefix)
            full = moe_full[id(moe[prefix])]
            mine = [k[len(prefix) :] for k in local if k.startswith(prefix)]
            out.update({prefix + k: full[k] for k in (mine if set(mine) == set(full) else full)})
    return out


def _under(key: str, prefixes: dict[str, Any]) -> str | None:
    """The prefix of ``prefixes`` that ``key`` starts with (a block's key prefix, ``""`` for the model itself)."""
    return next((p for p in prefixes if key.startswith(p)), None)


def _teach_peft() -> None:
    """Where PEFT is installed, import :mod:`tp_ffn.peft`, which teaches it to put LoRA on the parallel MLPs (so
    ``get_peft_model`` works on the result of :func:`parallelize_mlp` without more imports). A PEFT it cannot
    work with is a warning: the parallel model itself does not need it."""
    if importlib.util.find_spec("peft") is None:
        return
    try:
        import tp_ffn.peft  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an old or broken PEFT install must not stop parallelize_mlp
        warnings.warn(f"tp_ffn.hf: LoRA through PEFT is not available on the parallel MLPs: {e}", stacklevel=3)
