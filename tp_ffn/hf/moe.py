"""Hugging Face mixture-of-experts blocks on :class:`~tp_ffn.ParallelMoEFeedForward`: one tensor-parallel block
(one forward all-reduce) per MoE layer, instead of one block per expert.

Taken, in transformers 4.46 (experts as modules) and 5.x (experts fused in ``gate_up_proj [E, 2I, H]``, gate
rows first, and ``down_proj [E, H, I]``)::

    MixtralSparseMoeBlock    gate, experts.{e}.w1/w3/w2 (4.46) | experts.gate_up_proj/down_proj (5.x)
    Qwen2MoeSparseMoeBlock   gate, experts.{e}.gate_proj/up_proj/down_proj | fused, shared_expert, shared_expert_gate
    Qwen3MoeSparseMoeBlock   gate, experts as Qwen2-MoE's, no shared expert (5.x; transformers 4.46 has no Qwen3-MoE)
    OlmoeSparseMoeBlock      gate, experts as Qwen2-MoE's

Refused, with one line naming the module (``parallelize_mlp(strict=True)`` raises, ``strict=False`` leaves the
whole block dense and warns): Mixtral's router jitter, expert or shared-expert biases, experts already sharded or
laid out otherwise, and every other block that holds ``experts`` beside a ``gate`` / ``router`` (other routings,
token dropping). See docs/moe.md, "Hugging Face MoE models".

Checkpoints keep one tensor per expert on disk (transformers 5 converts them while loading, and back when
saving); :func:`load_moe_blocks` reads either layout, each rank only its slices of every expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..checkpoint import META_TO_HF
from ..groups import GroupLike
from ..moe import MoEConfig, ParallelMoEFeedForward, Routing
from ..safetensors_dir import SafetensorsDir
from ..sharding import ShardSpec
from .mlp import LAYOUTS, BuildOptions, MLPLayout, ParallelMLP, _build, _check_mlp, activation_name, is_dtensor

__all__ = ["MOE_BLOCKS", "ParallelSparseMoeBlock", "expert_reads", "load_moe_blocks"]


@dataclass(frozen=True)
class _Family:
    """What differs between the supported blocks: the names of an expert's projections (gate, up, down) when
    experts are modules, the names the block has in checkpoints (Mixtral's is renamed by transformers 5), and
    whether the top-k probabilities are renormalised whatever the config says (Mixtral)."""

    projections: tuple[str, str, str]
    saved_as: tuple[str, ...] = ()
    always_renormalise: bool = False


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
# Block class name -> family. Classes are matched by name (transformers 4 and 5 define them in different modules).
MOE_BLOCKS: dict[str, _Family] = {
    "MixtralSparseMoeBlock": _Family(("w1", "w3", "w2"), ("block_sparse_moe", "mlp"), always_renormalise=True),
    "Qwen2MoeSparseMoeBlock": _Family(_GATE_UP_DOWN),
    "Qwen3MoeSparseMoeBlock": _Family(_GATE_UP_DOWN),
    "OlmoeSparseMoeBlock": _Family(_GATE_UP_DOWN),
}


class ExpertRead(NamedTuple):
    """One stored expert tensor and where this rank's blocks of it go: ``stored[key]`` (a block-relative key of
    the HF layout) has the full shape ``spec.shape``, and its block k (``spec.blocks[k]``) is this rank's part of
    ``experts.<params[k]>`` (``w1`` gate, ``w3`` up, ``w2`` down): of every expert when ``expert`` is None (a
    fused tensor), else of that expert's slice."""

    key: str
    spec: ShardSpec
    params: tuple[str, ...]
    expert: int | None

    def targets(self, params: Mapping[str, Tensor]) -> list[Tensor]:
        """Where the blocks go in ``params`` (``{"w1": [E, n_r, H], "w3": ..., "w2": [E, H, n_r]}``)."""
        return [params[p] if self.expert is None else params[p][self.expert] for p in self.params]


def expert_reads(fused: bool, projections: tuple[str, str, str], specs: Mapping[str, ShardSpec]) -> list[ExpertRead]:
    """Every stored expert tensor of the layout and this rank's blocks of it, from the core block's own specs
    (``specs``: ``ParallelExperts.shard_spec`` of ``w1``, ``w3`` ``[E, I, H]`` and ``w2`` ``[E, H, I]``, split
    along I): rows ``[s, e)`` of every expert's gate and up, the same columns of its down.

    Per-expert layout (``fused=False``): ``experts.{e}.{gate}.weight [I, H]``, ``{up}``, ``{down} [H, I]``, each
    one expert of the stacked spec (:meth:`~tp_ffn.ShardSpec.select`). Fused (transformers 5):
    ``experts.gate_up_proj [E, 2I, H]`` is w1's and w3's specs joined (:meth:`~tp_ffn.ShardSpec.cat`: rows
    ``[s, e)`` then ``[I+s, I+e)``), ``experts.down_proj [E, H, I]`` is w2's. No slice is worked out here.
    """
    w1, w3, w2 = specs["w1"], specs["w3"], specs["w2"]
    if fused:
        return [
            ExpertRead("experts.gate_up_proj", ShardSpec.cat([w1, w3]), ("w1", "w3"), None),
            ExpertRead("experts.down_proj", w2, ("w2",), None),
        ]
    one = {"w1": w1.select(0), "w3": w3.select(0), "w2": w2.select(0)}
    gate, up, down = projections
    return [
        ExpertRead(f"experts.{e}.{name}.weight", one[param], (param,), e)
        for e in range(w1.shape[0])
        for name, param in ((gate, "w1"), (up, "w3"), (down, "w2"))
    ]


def stored_tensors(
    fused: bool, projections: tuple[str, str, str], w1: Tensor, w3: Tensor, w2: Tensor
) -> dict[str, Tensor]:
    """The full stacked experts (``w1, w3 [E, I, H]``, ``w2 [E, H, I]``) in the layout, each tensor its own."""
    if fused:
        return {"experts.gate_up_proj": torch.cat((w1, w3), dim=1), "experts.down_proj": w2.clone()}
    gate, up, down = projections
    out = {}
    for e in range(w1.shape[0]):
        out.update({f"experts.{e}.{gate}.weight": w1[e].clone(), f"experts.{e}.{up}.weight": w3[e].clone()})
        out[f"experts.{e}.{down}.weight"] = w2[e].clone()
    return out


@dataclass(frozen=True)
class _HFLayout:
    """What the adapter read off a dense HF block, checked: how to build and where its tensors live."""

    family: _Family
    fused: bool  # transformers 5: experts fused; transformers 4: one module per expert
    dim: int
    moe: MoEConfig
    activation: str
    dtype: torch.dtype
    keys: tuple[str, ...]  # the dense block's state-dict keys, in its order (full_state_dict gives them back)


class ParallelSparseMoeBlock(ParallelMoEFeedForward):
    """:class:`~tp_ffn.ParallelMoEFeedForward` holding a Hugging Face MoE block under its attribute names.

    ``gate`` is the model's own router module, the same object (transformers 4: an ``nn.Linear``; 5: e.g.
    ``MixtralTopKRouter``, whose output transformers 5 records for the auxiliary loss), replicated; the block
    routes with it as the model does (softmax in float32, top-k, renormalised as the family says). Rank r of W
    holds (``n_r``: its share of the expert size I, ``torch.tensor_split`` sizes; ``s_r`` of the shared one)::

        gate.weight                       [E, H]        replicated
        experts.w1, experts.w3            [E, n_r, H]   rows [start_r, end_r) of every expert's gate / up
        experts.w2                        [E, H, n_r]   the same columns of every expert's down
        shared_expert.{gate,up}_proj      [s_r, H]      (Qwen2-MoE) a ParallelMLP, split as usual
        shared_expert.down_proj           [H, s_r]
        shared_expert_gate.weight         [1, H]        replicated (the model's own nn.Linear)

    ``state_dict()`` holds these (the experts under tp_ffn's stacked keys); :meth:`full_state_dict` gives the
    dense block's own keys back (per-expert or fused). ``forward(hidden_states [B, S, H])`` returns what the
    model's block returned: ``(hidden_states, router_logits [B*S, E])`` in transformers 4, the hidden states in 5.
    One all-reduce forward; backward one of the input gradient and one of the ``[B*S, k(+1)]`` routing weights.
    """

    _HF_NAMES: ClassVar[dict[str, str]] = {"router": "gate"}

    def __init__(self, block: nn.Module, layout: _HFLayout, group: GroupLike = None) -> None:
        """``block``: the dense HF block (on the meta device or not), already checked into ``layout``."""
        super().__init__(
            layout.dim, layout.moe, activation=layout.activation, group=group, dtype=layout.dtype, device="meta"
        )
        self.layout = layout
        self.num_experts, self.top_k = layout.moe.num_experts, layout.moe.top_k
        # The model's router and shared gate themselves (replicated: nothing to split; their hooks stay).
        self.gate = block.gate
        if layout.moe.shared_expert_gate:
            self.shared_expert_gate = block.shared_expert_gate
        if layout.moe.shared_hidden_dim:
            self.shared_expert = _build_shared(block.shared_expert, layout, group)
        first = next(block.experts.parameters())
        if first.device.type != "meta":
            self._copy_experts(block.get_parameter, layout.fused, first.device)
        trained = first.requires_grad  # the same for every expert weight (checked)
        for p in (self.experts.w1, self.experts.w2, self.experts.w3):
            p.requires_grad_(trained)
        self.train(block.training)

    # The core block builds and reads ``router``: it is stored and found as ``gate``.
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self._HF_NAMES.get(name, name), value)

    @property
    def router(self) -> nn.Module:
        return self.gate

    @property
    def expert_specs(self) -> dict[str, ShardSpec]:
        """How the core block splits ``experts.w1``, ``w3``, ``w2`` (``ParallelExperts.shard_spec``): every read
        of the experts follows these."""
        return {name: self.experts.shard_spec(name) for name in ("w1", "w3", "w2")}

    def route(self, x: Tensor) -> Routing:
        """The model's own routing of ``x [T, H]``: transformers 5's router module, or transformers 4's
        ``softmax(gate(x), dtype=float32)``, top-k, renormalised for Mixtral or ``norm_topk_prob``; weights cast
        to x's dtype."""
        if self.layout.fused:
            logits, weights, indices = self.gate(x)
        else:
            logits = self.gate(x)
            weights, indices = logits.softmax(-1, dtype=torch.float32).topk(self.top_k, dim=-1)
            if self.config.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
        return Routing(weights.to(x.dtype), indices, logits)

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        """As the model's block: ``(y, router_logits)`` in transformers 4, ``y`` in 5 (its router is recorded)."""
        return super().forward(hidden_states, return_router_logits=not self.layout.fused)

    @torch.no_grad()
    def _copy_experts(self, stored: Callable[[str], Tensor], fused: bool, device: torch.device | None = None) -> None:
        """Fill ``experts.w1/w2/w3`` with this rank's slices of ``stored(key)`` (keys of the given layout)."""
        out = self._new_expert_params(device)
        for read in expert_reads(fused, self.layout.family.projections, self.expert_specs):
            for piece, target in zip(read.spec.take_blocks(stored(read.key), name=read.key), read.targets(out)):
                target.copy_(piece)
        self._set_expert_params(out)

    def _new_expert_params(self, device: torch.device | None) -> dict[str, Tensor]:
        ex = self.experts
        return {
            n: torch.empty(getattr(ex, n).shape, dtype=getattr(ex, n).dtype, device=device) for n in ("w1", "w2", "w3")
        }

    def _set_expert_params(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            old = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(value, requires_grad=old.requires_grad))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """The dense block's state dict, its own keys in its order (per-expert or fused), the same on every
        rank. Collective: every rank of the group must call it."""
        sd = self.dense_state_dict()
        out = {"gate.weight": sd.pop("router.weight")}
        experts = (sd.pop("experts.w1"), sd.pop("experts.w3"), sd.pop("experts.w2"))
        out.update(stored_tensors(self.layout.fused, self.layout.family.projections, *experts))
        for key, value in sd.items():  # the shared expert (w1/w2/w3 -> gate/down/up_proj) and its gate
            head, _, rest = key.partition(".")
            if head == "shared_expert":
                key = f"shared_expert.{META_TO_HF[rest.split('.')[0]]}.weight"
            out[key] = value
        if set(out) != set(self.layout.keys):
            raise RuntimeError(f"full_state_dict: built keys {sorted(out)}, the block had {list(self.layout.keys)}")
        return {k: out[k] for k in self.layout.keys}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={'fused' if self.layout.fused else 'per-expert'} (HF)"


def _build_shared(mlp: nn.Module, layout: _HFLayout, group: GroupLike) -> ParallelMLP:
    hidden, intermediate, _ = _check_mlp(mlp, "shared_expert")
    return _build(mlp, hidden, intermediate, False, layout.activation, BuildOptions(group, False, False, 1))


# --- finding and checking the blocks -------------------------------------------------------------------------


def _looks_like_moe(module: nn.Module) -> bool:
    """A block of experts and a router (any family, supported or not)."""
    names = set(module._modules) | set(module._parameters)
    return "experts" in module._modules and bool(names & {"gate", "router"})


class _Refused(Exception):
    """A block the adapter does not take (``str(e)``: why), as opposed to a malformed one (ValueError)."""


def _inspect(block: nn.Module, config: Any, path: str) -> _HFLayout:
    """The layout of a supported block, checked; :class:`_Refused` for one the core block cannot compute."""
    name = type(block).__name__
    family = MOE_BLOCKS.get(name)
    if family is None:
        raise _Refused(
            f"a mixture of experts tp_ffn.hf does not take (its routing or experts are not those of "
            f"{', '.join(sorted(MOE_BLOCKS))})"
        )
    jitter = getattr(block, "jitter_noise", 0) or 0
    if jitter > 0:
        raise _Refused(f"router jitter (config.router_jitter_noise={jitter}) is not supported; set it to 0")
    gate = block.gate
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or getattr(gate, "bias", None) is not None:
        raise _Refused(f"gate: expected a router with a weight [E, H] and no bias, got {gate!r}")
    num_experts, dim = weight.shape
    fused = type(gate) is not nn.Linear  # transformers 5: a router module returning (logits, weights, indices)
    top_k = getattr(gate if fused else block, "top_k", None)
    renormalise = family.always_renormalise or bool(getattr(gate if fused else block, "norm_topk_prob", False))
    if fused:
        intermediate, act_module = _check_fused_experts(block.experts, num_experts, dim, path)
    else:
        intermediate, act_module = _check_expert_modules(block.experts, family, num_experts, dim, path)
    activation = activation_name(act_module, config, f"{path}.experts")
    shared = block._modules.get("shared_expert")
    shared_dim = 0
    if shared is not None:
        if any(getattr(shared._modules.get(n), "bias", None) is not None for n in _GATE_UP_DOWN):
            raise _Refused("shared_expert: biases are not supported")
        _, shared_dim, _ = _check_mlp(shared, f"{path}.shared_expert")
        if activation_name(shared, config, f"{path}.shared_expert") != activation:
            raise _Refused("shared_expert: its activation differs from the experts'")
    shared_gate = block._modules.get("shared_expert_gate")
    if shared_gate is not None and (
        type(shared_gate) is not nn.Linear or shared_gate.bias is not None or shared_gate.out_features != 1
    ):
        raise _Refused(f"shared_expert_gate: expected nn.Linear(H, 1, bias=False), got {shared_gate!r}")
    if is_dtensor(weight):
        raise ValueError(
            f"{path}.gate.weight: expected a full tensor, got a DTensor (leave the MoE blocks out of tp_plan)"
        )
    experts = list(block.experts.parameters())
    if len({p.requires_grad for p in experts}) > 1:
        raise ValueError(f"{path}.experts: expected requires_grad the same on every expert weight (they are stacked)")
    if {p.dtype for p in experts} != {weight.dtype}:
        raise ValueError(
            f"{path}: expected the router and the experts in one dtype, got {weight.dtype} and "
            f"{sorted({str(p.dtype) for p in experts})}"
        )
    moe = MoEConfig(
        num_experts, top_k, intermediate, shared_hidden_dim=shared_dim, shared_expert_gate=shared_gate is not None,
        norm_topk_prob=renormalise,
    )  # fmt: skip
    return _HFLayout(family, fused, dim, moe, activation, weight.dtype, tuple(block.state_dict().keys()))


def _check_fused_experts(experts: nn.Module, num_experts: int, dim: int, path: str) -> tuple[int, nn.Module]:
    """transformers 5's fused experts: ``gate_up_proj [E, 2I, H]`` (gate rows, then up), ``down_proj [E, H, I]``."""
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
    flags.update({"has_post_expert_norm": False, "_is_expert_parallel": False})
    odd = {k: getattr(experts, k) for k, want in flags.items() if getattr(experts, k, want) != want}
    if odd:
        raise _Refused(f"experts: expected concatenated gate/up experts without biases, got {odd}")
    gate_up, down = experts._parameters.get("gate_up_proj"), experts._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3:
        raise _Refused(f"experts: expected parameters gate_up_proj and down_proj, got {sorted(experts._parameters)}")
    for p, n in ((gate_up, "gate_up_proj"), (down, "down_proj")):
        if is_dtensor(p):
            raise ValueError(f"{path}.experts.{n}: expected a full tensor, got a DTensor")
    intermediate = gate_up.shape[1] // 2
    want = {"gate_up_proj": (num_experts, 2 * intermediate, dim), "down_proj": (num_experts, dim, intermediate)}
    for n, p in (("gate_up_proj", gate_up), ("down_proj", down)):
        if tuple(p.shape) != want[n]:
            raise ValueError(f"{path}.experts.{n}: expected shape {want[n]}, got {tuple(p.shape)}")
    return intermediate, experts


def _check_expert_modules(
    experts: nn.Module, family: _Family, num_experts: int, dim: int, path: str
) -> tuple[int, nn.Module]:
    """transformers 4's experts: a ModuleList of E MLPs with the family's three ``nn.Linear`` projections."""
    modules = list(experts) if isinstance(experts, nn.ModuleList) else []
    if len(modules) != num_experts:
        raise ValueError(f"{path}.experts: expected a ModuleList of {num_experts} experts (gate), got {experts!r}")
    gate, up, down = family.projections
    first = modules[0]
    intermediate = first._modules[gate].weight.shape[0] if isinstance(first._modules.get(gate), nn.Linear) else -1
    want = {gate: (intermediate, dim), up: (intermediate, dim), down: (dim, intermediate)}
    for e, expert in enumerate(modules):
        if type(getattr(expert, "act_fn", None)) is not type(first.act_fn):
            raise _Refused(f"experts.{e}: its activation differs from expert 0's")
        for n, shape in want.items():
            layer = expert._modules.get(n)
            if type(layer) is not nn.Linear:
                raise _Refused(f"experts.{e}.{n}: expected nn.Linear, got {type(layer).__name__}")
            if layer.bias is not None:
                raise _Refused(f"experts.{e}.{n}: expert biases are not supported")
            if is_dtensor(layer.weight):
                raise ValueError(f"{path}.experts.{e}.{n}.weight: expected a full tensor, got a DTensor")
            if tuple(layer.weight.shape) != shape:
                raise ValueError(
                    f"{path}.experts.{e}.{n}.weight: expected shape {shape}, got {tuple(layer.weight.shape)}"
                )
    return intermediate, first


def _prepare_moe(module: nn.Module, config: Any, path: str) -> str | Callable[[BuildOptions], nn.Module]:
    """For :func:`~tp_ffn.hf.parallelize_mlp`: the reason, for an MoE block it refuses; else the function
    building its :class:`ParallelSparseMoeBlock`."""
    try:
        layout = _inspect(module, config, path)
    except _Refused as why:
        return f"{type(module).__name__}: {why}"
    return lambda opts: ParallelSparseMoeBlock(module, layout, opts.group)


# Claimed before anything inside it is looked at, so its experts are neither MLPs nor unsupported gated MLPs.
LAYOUTS.append(
    MLPLayout(
        projections="mixture-of-experts block: router gate, experts (per-expert MLPs or fused expert parameters), "
        "shared expert",
        families="Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE",
        parallel_class=ParallelSparseMoeBlock,
        matches=lambda m: not isinstance(m, ParallelMoEFeedForward) and _looks_like_moe(m),
        prepare=_prepare_moe,
        what="a block",
    )
)


# --- loading ---------------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> Iterator[tuple[str, ParallelSparseMoeBlock]]:
    for path, module in model.named_modules():
        if isinstance(module, ParallelSparseMoeBlock):
            yield path, module


def _saved_prefix(
    path: str, block: ParallelSparseMoeBlock, to_ckpt: Callable[[str], str], keys: Mapping
) -> tuple[str, bool]:
    """The checkpoint's name for the block (Mixtral's is ``block_sparse_moe`` on disk, ``mlp`` in transformers 5)
    and whether its experts are stored fused there."""
    parent, _, name = path.rpartition(".")
    names = [name] + [n for n in block.layout.family.saved_as if n != name]
    gate = block.layout.family.projections[0]
    for candidate in names:
        prefix = f"{parent}.{candidate}" if parent else candidate
        if to_ckpt(f"{prefix}.experts.gate_up_proj") in keys:
            return prefix, True
        if to_ckpt(f"{prefix}.experts.0.{gate}.weight") in keys:
            return prefix, False
    looked = [f"{parent}.{n}.experts.{{gate_up_proj | 0.{gate}.weight}}" for n in names]
    raise ValueError(f"the checkpoint lacks the experts of {path} (looked for {looked})")


@torch.no_grad()
def load_moe_blocks(
    model: nn.Module, files: SafetensorsDir, to_ckpt: Callable[[str], str], device: torch.device
) -> tuple[set[str], set[str]]:
    """Read every :class:`ParallelSparseMoeBlock`'s router whole and this rank's slices of every expert, from
    per-expert or fused checkpoint tensors, under the block's name or the name its family saves it as.

    Returns ``(checkpoint keys read, model parameter names loaded)``. A missing expert tensor or a wrong shape is
    a ``ValueError`` naming the file or block; nothing is drawn at random.
    """
    used: set[str] = set()
    loaded: set[str] = set()
    for path, block in _blocks(model):
        try:
            prefix, fused = _saved_prefix(path, block, to_ckpt, files.shape)
        except ValueError as e:
            raise ValueError(f"{files.root}: {e}") from None
        reads = expert_reads(fused, block.layout.family.projections, block.expert_specs)
        keys = {r.key: to_ckpt(f"{prefix}.{r.key}") for r in reads}
        missing = [k for k in keys.values() if k not in files.shape]
        if missing:
            raise ValueError(
                f"{files.root}: the checkpoint lacks {len(missing)} expert tensors of {path}: {missing[:5]}"
            )
        out = block._new_expert_params(device)
        parts = [(keys[r.key], r.targets(out), r.spec) for r in reads]
        gate_key = to_ckpt(f"{prefix}.gate.weight")
        if gate_key in files.shape:
            weight = block.gate.weight
            gate = torch.empty(weight.shape, dtype=weight.dtype, device=device)
            parts.append((gate_key, gate, ShardSpec.replicated(weight.shape)))
            used.add(gate_key)
        files.read_many(parts)  # checks every stored shape against its spec before reading
        block._set_expert_params(out)
        if gate_key in files.shape:
            block.gate.weight = nn.Parameter(gate, requires_grad=block.gate.weight.requires_grad)
            loaded.add(f"{path}.gate.weight")
        used.update(keys.values())
        loaded.update(f"{path}.experts.{n}" for n in ("w1", "w2", "w3"))
    return used, loaded
