"""Mixture-of-experts feed-forward block: the dense reference and the tensor-parallel block.

E SwiGLU experts stored stacked, a replicated router with the routings of Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3 and Llama 4, an optional shared expert with an optional sigmoid gate (Qwen2-MoE), and
the load-balancing auxiliary loss as Hugging Face transformers computes it. See ``docs/moe.md``.

State-dict keys (both blocks; the parallel one holds this rank's blocks of the split tensors)::

    router.weight                    [E, dim]         replicated
    router.e_score_correction_bias   [E]              replicated buffer, routing "sigmoid" only
    experts.w1                       [E, I, dim]      gate; split along dim 1 (I)
    experts.w2                       [E, dim, I]      down; split along dim 2 (I)
    experts.w3                       [E, I, dim]      up;   split along dim 1 (I)
    shared_expert.w{1,2,3}.weight    as FeedForward(dim, I_s)   split as ParallelFeedForward splits them
    shared_expert_gate.weight        [1, dim]         replicated

``experts.w1[e]`` is expert e's ``nn.Linear(dim, I).weight``: Mixtral's ``experts.{e}.w1.weight``,
Qwen/OLMoE/DeepSeek's ``experts.{e}.gate_proj.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .comm import (
    all_gather_shard,
    copy_to_parallel,
    gather_from_sequence,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
)
from .ffn import FeedForward, ParallelFeedForward
from .grouped import dispatch_by_expert, grouped_swiglu
from .groups import GroupLike, TPGroup, resolve_group
from .init import init_linear_shard_
from .layers import check_features, check_input
from .sharding import ShardSpec, shard_bounds, shard_spec_of
from .swiglu import compute_dtype, get_activation

__all__ = [
    "ROUTINGS",
    "MoEConfig",
    "MoEFeedForward",
    "ParallelMoEFeedForward",
    "Router",
    "load_balancing_loss",
    "moe_shapes",
]

ROUTINGS = ("softmax", "sigmoid", "topk_sigmoid")
_WEIGHTS_ON = ("output", "input")
# DeepSeek-V3's guard against a zero sum when it renormalises the selected sigmoid scores (HF's value).
_SIGMOID_NORM_EPS = 1e-20


@dataclass(frozen=True)
class MoEConfig:
    """What an MoE layer is, validated once here.

    ``num_experts`` (E) routed experts of intermediate size ``hidden_dim`` (I; HF ``moe_intermediate_size``,
    Mixtral ``intermediate_size``); each token goes to ``top_k`` of them. ``shared_hidden_dim`` > 0
    adds a shared expert every token goes through (Qwen2-MoE ``shared_expert_intermediate_size``;
    DeepSeek ``n_shared_experts * moe_intermediate_size``), ``shared_expert_gate`` its sigmoid gate
    (Qwen2-MoE).

    ``routing``:

    - ``"softmax"``: softmax over all E logits (at least float32), top-k of the probabilities,
      renormalised to sum 1 if ``norm_topk_prob`` (Mixtral, Qwen3-MoE: True; Qwen2-MoE, OLMoE: False).
    - ``"sigmoid"`` (DeepSeek-V3): float32 sigmoid scores; experts chosen by ``score +
      e_score_correction_bias`` (a buffer, not trained by gradient), within the ``topk_group`` best of
      ``n_group`` expert groups (a group's score: the sum of its two best); the weights are the unbiased
      scores of the chosen, divided by their sum (+1e-20) if ``norm_topk_prob``.
    - ``"topk_sigmoid"`` (Llama 4): top-k of the logits, weights ``sigmoid(logit)``.

    Every routing's weights are then multiplied by ``routed_scaling_factor`` (DeepSeek-V3: 2.5) and
    applied to the expert's output, or with ``weights_on="input"`` to its input (Llama 4).
    ``norm_topk_prob`` defaults to True for softmax and sigmoid routings and must be False for
    ``topk_sigmoid``; ``weights_on`` defaults to ``"input"`` for ``topk_sigmoid``, else ``"output"``.
    """

    num_experts: int
    top_k: int
    hidden_dim: int
    shared_hidden_dim: int = 0
    shared_expert_gate: bool = False
    routing: str = "softmax"
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    weights_on: str | None = None

    def __post_init__(self) -> None:
        check_features("num_experts", self.num_experts)
        check_features("top_k", self.top_k)
        check_features("hidden_dim", self.hidden_dim)
        check_features("shared_hidden_dim", self.shared_hidden_dim, at_least=0)
        check_features("n_group", self.n_group)
        check_features("topk_group", self.topk_group)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected at most num_experts ({self.num_experts}), got {self.top_k}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: expected one of {list(ROUTINGS)}, got {self.routing!r}")
        if not isinstance(self.shared_expert_gate, bool):
            raise TypeError(f"shared_expert_gate: expected a bool, got {self.shared_expert_gate!r}")
        if self.shared_expert_gate and not self.shared_hidden_dim:
            raise ValueError(
                "shared_expert_gate: expected False without a shared expert (shared_hidden_dim=0), got True"
            )
        factor = self.routed_scaling_factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not (math.isfinite(factor) and factor > 0)
        ):
            raise ValueError(f"routed_scaling_factor: expected a finite number > 0, got {factor!r}")
        norm = self.norm_topk_prob
        if norm is None:
            norm = self.routing != "topk_sigmoid"
        elif not isinstance(norm, bool):
            raise TypeError(f"norm_topk_prob: expected a bool or None, got {norm!r}")
        elif norm and self.routing == "topk_sigmoid":
            raise ValueError("norm_topk_prob: expected False or None with routing='topk_sigmoid' (Llama 4), got True")
        weights_on = self.weights_on
        if weights_on is None:
            weights_on = "input" if self.routing == "topk_sigmoid" else "output"
        elif weights_on not in _WEIGHTS_ON:
            raise ValueError(f"weights_on: expected one of {list(_WEIGHTS_ON)} or None, got {weights_on!r}")
        if self.n_group > 1 or self.topk_group > 1:
            self._check_groups()
        object.__setattr__(self, "norm_topk_prob", norm)
        object.__setattr__(self, "weights_on", weights_on)

    def _check_groups(self) -> None:
        e, groups, chosen = self.num_experts, self.n_group, self.topk_group
        if self.routing != "sigmoid":
            raise ValueError(f"n_group: expected 1 unless routing='sigmoid' (DeepSeek-V3), got {groups}")
        if e % groups or e // groups < 2:
            raise ValueError(
                f"n_group: expected a divisor of num_experts ({e}) leaving at least 2 experts per group, got {groups}"
            )
        if chosen > groups or self.top_k > chosen * (e // groups):
            raise ValueError(
                f"topk_group: expected at most n_group ({groups}) groups holding at least top_k ({self.top_k}) "
                f"experts ({e // groups} per group), got {chosen}"
            )


class Routing(NamedTuple):
    """What a router decides for ``T`` tokens: ``weights [T, k]`` (the input's dtype),
    ``indices [T, k]`` (expert ids, int64), ``logits [T, E]`` (for the auxiliary loss)."""

    weights: Tensor
    indices: Tensor
    logits: Tensor


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """The routing of :class:`MoEConfig` (no parallel code; replicated in the parallel block).

    ``weight [E, dim]`` (an ``nn.Linear(dim, E, bias=False)`` weight, drawn as one);
    ``e_score_correction_bias [E]`` (buffer, zeros, at least float32) with routing ``"sigmoid"``.
    ``x [T, dim] -> Routing(weights [T, k], indices [T, k], logits [T, E])``.
    """

    def __init__(
        self,
        dim: int,
        config: MoEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty((config.num_experts, dim), dtype=dtype, device=device))
        if config.routing == "sigmoid":
            # At least float32 whatever the weights' dtype, as HF keeps it: it decides between close scores.
            bias_dtype = _at_least_float32(dtype or torch.get_default_dtype())
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(config.num_experts, dtype=bias_dtype, device=device)
            )
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's draw

    def forward(self, x: Tensor) -> Routing:
        c = self.config
        if c.routing == "softmax":  # Mixtral, Qwen2/3-MoE, OLMoE
            logits = F.linear(x, self.weight)
            probs = logits.softmax(-1, dtype=_at_least_float32(logits.dtype))
            weights, indices = probs.topk(c.top_k, dim=-1)
            if c.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
        elif c.routing == "sigmoid":  # DeepSeek-V3
            f = _at_least_float32(x.dtype)
            logits = F.linear(x.to(f), self.weight.to(f))
            scores = logits.sigmoid()
            indices = self._select(scores.detach() + self.e_score_correction_bias.to(f))
            weights = scores.gather(1, indices)
            if c.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + _SIGMOID_NORM_EPS)
        else:  # topk_sigmoid, Llama 4
            logits = F.linear(x, self.weight)
            top, indices = logits.topk(c.top_k, dim=-1)
            weights = top.to(_at_least_float32(top.dtype)).sigmoid()
        if c.routed_scaling_factor != 1:
            weights = weights * c.routed_scaling_factor
        return Routing(weights.to(x.dtype), indices, logits)

    def _select(self, choice: Tensor) -> Tensor:
        """Top-k of ``choice [T, E]``, only among the ``topk_group`` best groups (HF's DeepSeek-V3 rule:
        a group scores the sum of its two best; experts of other groups count as 0, not minus infinity)."""
        c = self.config
        if c.n_group > 1:
            grouped = choice.view(choice.shape[0], c.n_group, -1)
            best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
            keep = grouped.new_zeros(grouped.shape[:-1], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep[..., None], 0.0).view_as(choice)
        return choice.topk(c.top_k, dim=-1).indices

    def extra_repr(self) -> str:
        c = self.config
        return f"routing={c.routing!r}, num_experts={c.num_experts}, top_k={c.top_k}"


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The auxiliary load-balancing loss of Switch Transformer as transformers computes it
    (``load_balancing_loss_func``, Mixtral / Qwen2-MoE / OLMoE in 4.46)::

        p = softmax(logits)                 over all E experts, every layer's tokens concatenated
        f_e = mean over tokens of [e in top-k(p)]     (summed over the k slots: sum_e f_e = k)
        P_e = mean over tokens of p_e
        loss = E * sum_e f_e P_e

    ``router_logits``: one ``[T, E]`` tensor or one per layer (concatenated, as HF does: ``f`` and
    ``P`` are means over all layers' tokens, not a mean of per-layer losses). ``attention_mask [B, S]``
    (``B S = T``, 1 = a real token) restricts both means to real tokens. The softmax runs in the
    logits' dtype (as HF's); ``f`` in at least float32. Gradients reach the logits through ``P`` only.
    Multiply by the model's coefficient (HF ``router_aux_loss_coef``) yourself.
    """
    layers = [router_logits] if isinstance(router_logits, Tensor) else list(router_logits)
    if not layers or any(not isinstance(t, Tensor) or t.dim() != 2 or t.shape[-1] != num_experts for t in layers):
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in layers]
        raise ValueError(f"router_logits: expected [T, {num_experts}] tensors (one per layer), got {shapes}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts ({num_experts}), got {top_k}")
    logits = torch.cat([t.to(layers[0].device) for t in layers])
    probs = logits.softmax(-1)
    # 1 where an expert is among the token's top k (the k experts differ: their one-hots summed)
    chosen = probs.new_zeros(probs.shape, dtype=_at_least_float32(probs.dtype))
    chosen.scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    if attention_mask is None:
        fraction, prob = chosen.mean(0), probs.mean(0)
    else:
        if attention_mask.dim() != 2 or attention_mask.numel() * len(layers) != logits.shape[0]:
            raise ValueError(
                f"attention_mask: expected [B, S] with B*S = {logits.shape[0] // len(layers)} tokens per layer, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        real = attention_mask.reshape(-1).to(logits.device).repeat(len(layers))[:, None]
        fraction = (chosen * real).sum(0) / real.sum()
        prob = (probs * real).sum(0) / real.sum()
    return num_experts * (fraction * prob).sum()


def moe_shapes(dim: int, config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every tensor of the block by state-dict key, in state-dict order."""
    e, i = config.num_experts, config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"router.weight": (e, dim)}
    if config.routing == "sigmoid":
        shapes["router.e_score_correction_bias"] = (e,)
    shapes.update({"experts.w1": (e, i, dim), "experts.w2": (e, dim, i), "experts.w3": (e, i, dim)})
    if config.shared_hidden_dim:
        s = config.shared_hidden_dim
        shapes.update({
            "shared_expert.w1.weight": (s, dim),
            "shared_expert.w2.weight": (dim, s),
            "shared_expert.w3.weight": (s, dim),
        })  # fmt: skip
    if config.shared_expert_gate:
        shapes["shared_expert_gate.weight"] = (1, dim)
    return shapes


class Experts(nn.Module):
    """E dense SwiGLU experts, stacked: ``w1, w3 [E, I, dim]``, ``w2 [E, dim, I]``; expert e is
    ``FeedForward`` with ``w1.weight = w1[e]`` and so on, drawn as one (w1, w2, w3), expert after expert."""

    def __init__(
        self, dim: int, config: MoEConfig, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> None:
        super().__init__()
        e, i = config.num_experts, config.hidden_dim
        kw = {"dtype": dtype, "device": device}
        self.w1 = nn.Parameter(torch.empty((e, i, dim), **kw))
        self.w2 = nn.Parameter(torch.empty((e, dim, i), **kw))
        self.w3 = nn.Parameter(torch.empty((e, i, dim), **kw))
        if self.w1.device.type != "meta":
            for k in range(e):
                for w in (self.w1, self.w2, self.w3):
                    nn.init.kaiming_uniform_(w.data[k], a=math.sqrt(5))


def _check_moe_state_dict(sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], name: str) -> None:
    """Raise naming every missing or unexpected key, or the first wrong shape."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"{name}: expected a mapping of str to Tensor, got {type(sd).__name__}")
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        raise ValueError(f"{name}: missing keys {missing}, unexpected keys {extra} (expected exactly {list(expected)})")
    for key, shape in expected.items():
        value = sd[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}[{key!r}]: expected shape {shape}, got {tuple(value.shape)}")


def _check_block_args(
    dim: int, config: MoEConfig, activation: str
) -> tuple[int, MoEConfig, Callable[[Tensor], Tensor]]:
    """What both blocks take: ``(dim, config, the activation function)``, validated."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected an MoEConfig, got {type(config).__name__}")
    return check_features("dim", dim), config, get_activation(activation)


class MoEFeedForward(nn.Module):
    """The dense mixture-of-experts block (the reference; no parallel code).

    ``x [*, dim] -> [*, dim]``: ``y_t = sum over t's k experts e of weight_te * expert_e(x_t)`` (Llama 4:
    ``expert_e(weight_te * x_t)``) ``+ shared_expert(x_t)`` (``* sigmoid(shared_expert_gate(x_t))``).
    ``forward(x, return_router_logits=True)`` returns ``(y, logits [T, E])`` for
    :func:`load_balancing_loss` (``T``: the tokens of ``x``). Keys and shapes: :func:`moe_shapes`.
    """

    def __init__(
        self,
        dim: int,
        config: MoEConfig,
        *,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.config, self.act = _check_block_args(dim, config, activation)
        self.activation = activation
        kw = {"dtype": dtype, "device": device}
        # Drawn in this order (router, experts, shared expert, gate), as the parallel block draws them.
        self.router = Router(dim, config, **kw)
        self.experts = Experts(dim, config, **kw)
        self.shared_expert = (
            FeedForward(dim, config.shared_hidden_dim, activation=activation, **kw)
            if config.shared_hidden_dim
            else None
        )
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False, **kw) if config.shared_expert_gate else None

    def forward(self, x: Tensor, *, return_router_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, self.router.weight, self.dim, what="dim")
        x2 = x.reshape(-1, self.dim)
        weights, indices, logits = self.router(x2)
        on_input = self.config.weights_on == "input"
        w1, w2, w3 = self.experts.w1, self.experts.w2, self.experts.w3
        y = x2.new_zeros(x2.shape, dtype=compute_dtype(x2))  # under autocast, the GEMMs' dtype
        for e in range(self.config.num_experts):
            token, slot = (indices == e).nonzero(as_tuple=True)
            weight = weights[token, slot, None]
            xe = x2[token] * weight if on_input else x2[token]
            out = F.linear(self.act(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
            y = y.index_add(0, token, (out if on_input else out * weight).to(y.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x2)
            if self.shared_expert_gate is not None:
                shared = self.shared_expert_gate(x2).sigmoid() * shared
            y = y + shared
        y = y.view(x.shape)
        return (y, logits) if return_router_logits else y

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, hidden_dim={c.hidden_dim}, shared_hidden_dim={c.shared_hidden_dim}, activation={self.activation!r}"


def _expert_specs(dim: int, config: MoEConfig, tp: TPGroup) -> dict[str, ShardSpec]:
    """The routed experts' split weights, by attribute of :class:`ParallelExperts` (every other tensor
    of the block is replicated, or is the shared expert's, which :class:`ParallelFeedForward` splits):
    each expert's hidden dimension over the group, as :class:`ParallelFeedForward` splits its own."""
    full = moe_shapes(dim, config)
    return {
        "w1": ShardSpec.split(full["experts.w1"], 1, tp.rank, tp.size),
        "w2": ShardSpec.split(full["experts.w2"], 2, tp.rank, tp.size),
        "w3": ShardSpec.split(full["experts.w3"], 1, tp.rank, tp.size),
    }


class ParallelExperts(nn.Module):
    """This rank's rows of every expert's w1/w3 and the same columns of w2: ``w1, w3 [E, n_r, dim]``,
    ``w2 [E, dim, n_r]`` (``n_r``: this rank's ``torch.tensor_split`` share of I, as
    :class:`~tp_ffn.ParallelFeedForward`). Drawn as :class:`Experts` draws the full weights.
    Publishes :meth:`shard_spec` (the layer protocol of :mod:`tp_ffn.sharding`)."""

    def __init__(
        self, dim: int, config: MoEConfig, tp: TPGroup, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.tp = tp
        self.specs = _expert_specs(dim, config, tp)
        kw = {"dtype": dtype, "device": device}
        for name, spec in self.specs.items():
            setattr(self, name, nn.Parameter(torch.empty(spec.local_shape, **kw)))
        if self.w1.device.type != "meta":
            i, blocks = config.hidden_dim, self.specs["w1"].blocks
            for k in range(config.num_experts):
                init_linear_shard_(self.w1.data[k], None, dim, i, dim=0, blocks=blocks)
                init_linear_shard_(self.w2.data[k], None, i, dim, dim=1, blocks=blocks)
                init_linear_shard_(self.w3.data[k], None, dim, i, dim=0, blocks=blocks)

    def shard_spec(self, name: str) -> ShardSpec:
        """How parameter ``name`` (``w1``, ``w2``, ``w3``) is split over the group."""
        if name not in self.specs:
            raise ValueError(f"ParallelExperts.shard_spec: expected one of {sorted(self.specs)}, got {name!r}")
        return self.specs[name]

    def extra_repr(self) -> str:
        (s, e), = self.specs["w1"].blocks
        return f"hidden shard=[{s}, {e})"


class _KeepSequenceBlockGrad(torch.autograd.Function):
    """Forward: identity; backward: zero the gradient outside this rank's block of the sequence."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rank: int, world: int, dim: int) -> Tensor:
        ctx.rank, ctx.world, ctx.dim = rank, world, dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        start, end = shard_bounds(grad.shape[ctx.dim], ctx.world, ctx.rank)
        out = torch.zeros_like(grad)
        out.narrow(ctx.dim, start, end - start).copy_(grad.narrow(ctx.dim, start, end - start))
        return out, None, None, None


class ParallelMoEFeedForward(nn.Module):
    """The MoE block with every expert split over a tensor-parallel group; one all-reduce per layer.

    Rank r holds rows ``[start_r, end_r)`` of every expert's w1/w3 and the same columns of w2 (and its
    shard of the shared expert, as :class:`~tp_ffn.ParallelFeedForward`); the router and the shared
    expert's gate are replicated. For ``T`` tokens, top-k routing and ``N = T k``::

        x [T, dim] -+-> router (replicated) -> indices [T, k]: rows sorted by expert
                    |                         weights [T, k], gate [T, 1] --copy--> scale the partial outputs
                    +-copy-+-> experts on this rank's shards (grouped GEMMs) * weights: partial [T, dim] -+
                           +-> shared expert shard * gate:                          partial [T, dim] -+-> sum -all-reduce-> y

    Forward: one all-reduce of ``[T, dim]``. Backward: one all-reduce of the input gradient ``[T, dim]``
    and one of ``[T, k]`` (``[T, k+1]`` with the shared expert's gate): the routing weights multiply this
    rank's partial expert outputs, so their gradient is a sum over ranks of partial dot products.
    With ``sequence_parallel`` (input and output ``[b, s/W, dim]`` along ``sequence_dim``): forward one
    all-gather and one reduce-scatter; backward one reduce-scatter (input gradient), one all-gather
    (output gradient) and the same ``[T, k]`` all-reduce. The router then runs on the gathered
    sequence, every rank on all ``T = b s`` tokens (its logits and the auxiliary loss are those of the
    whole sequence, the same on every rank), and its input gradient enters the reduce-scatter from the
    rank that holds those tokens only.

    Expert GEMMs: tokens sorted by expert, one ``torch._grouped_mm`` per projection where it takes the
    operands (see :func:`~tp_ffn.grouped.grouped_mm_fits`; ``grouped_gemm=False``: never), else one GEMM
    per expert with tokens. Kept for backward per token: ``x`` once (``dim``), per routed slot
    ``g, u [n_r]`` and its weight, the shared expert's ``g, u [n_s,r]`` and gate, plus what the router keeps.
    """

    def __init__(
        self,
        dim: int,
        config: MoEConfig,
        *,
        activation: str = "silu",
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        grouped_gemm: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.config, self.act = _check_block_args(dim, config, activation)
        self.activation = activation
        if isinstance(sequence_dim, bool) or not isinstance(sequence_dim, int):
            raise TypeError(f"sequence_dim: expected an int, got {type(sequence_dim).__name__} ({sequence_dim!r})")
        self.tp = resolve_group(group)
        for name, size in (("hidden_dim", config.hidden_dim), ("shared_hidden_dim", config.shared_hidden_dim)):
            if 0 < size < self.tp.size:
                raise ValueError(
                    f"config.{name}: expected at least one row per rank (>= the tensor-parallel size "
                    f"{self.tp.size}), got {size}"
                )
        self.sequence_parallel, self.sequence_dim = bool(sequence_parallel), sequence_dim
        self.grouped_gemm = bool(grouped_gemm)
        kw = {"dtype": dtype, "device": device}
        # The dense block's order, so that both draw the same random stream.
        self.router = Router(dim, config, **kw)
        self.experts = ParallelExperts(dim, config, self.tp, **kw)
        # The shared expert's weights live in a ParallelFeedForward (its split, init and state dict); its
        # forward is not called: this block runs it inside its own region, with one reduction for all.
        self.shared_expert = (
            ParallelFeedForward(
                dim, config.shared_hidden_dim, activation=activation, group=group, overlap_comm=False, **kw
            )
            if config.shared_hidden_dim
            else None
        )
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False, **kw) if config.shared_expert_gate else None

    @property
    def _active_sequence_dim(self) -> int | None:
        return self.sequence_dim if self.sequence_parallel and self.tp.size > 1 else None

    def forward(self, x: Tensor, *, return_router_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, self.router.weight, self.dim, what="dim", sequence_dim=self._active_sequence_dim)
        tp, group, c = self.tp, self.tp.group, self.config
        sp = self._active_sequence_dim is not None
        x_router = x
        x = gather_from_sequence(x, group, self.sequence_dim) if sp else copy_to_parallel(x, group)
        shape = x.shape
        # One contiguous [T, dim] buffer that the router and the experts both read (and keep for backward).
        x2 = x.reshape(-1, self.dim).contiguous()
        if sp:
            # The router reads the whole sequence on every rank: only this rank's tokens send it a gradient.
            x_router = _KeepSequenceBlockGrad.apply(x2.view(shape), tp.rank, tp.size, self.sequence_dim % len(shape))
        xr2 = x_router.reshape(-1, self.dim)
        weights, indices, logits = self.route(xr2)
        gate = None if self.shared_expert_gate is None else self.shared_expert_gate(xr2).sigmoid()
        weights, gate = self._enter_partial(weights, gate)

        dispatch = dispatch_by_expert(indices, c.num_experts)
        ex = self.experts
        y = grouped_swiglu(
            x2, ex.w1, ex.w3, ex.w2, weights.reshape(-1)[dispatch.order], dispatch, self.activation,
            scale_input=c.weights_on == "input", grouped=self.grouped_gemm,
        )  # fmt: skip
        if self.shared_expert is not None:
            s = self.shared_expert
            scale = None if gate is None else gate.reshape(-1)
            y = y + grouped_swiglu(x2, s.w1.weight, s.w3.weight, s.w2.weight, scale, None, self.activation)
        y = y.view(shape)
        if self._active_sequence_dim is not None:
            y = reduce_scatter_to_sequence(y, group, self.sequence_dim)
        else:
            y = reduce_from_parallel(y, group, inplace=True)
        return (y, logits) if return_router_logits else y

    def route(self, x: Tensor) -> Routing:
        """The routing of ``x [T, dim]``, computed on every rank from the replicated router (the same
        everywhere). An adapter whose router is the model's own module (``tp_ffn.hf``: so its numerics and
        hooks stay the model's) overrides this; the expert path does not change."""
        return self.router(x)

    def _enter_partial(self, weights: Tensor, gate: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The routing weights ``[T, k]`` and gate ``[T, 1]`` scale this rank's partial outputs: pass them
        into the region together, so their gradients are summed over the group by one all-reduce."""
        if self.tp.size == 1:
            return weights, gate
        if gate is None:
            return copy_to_parallel(weights, self.tp.group), None
        both = copy_to_parallel(torch.cat((weights, gate.to(weights.dtype)), dim=-1), self.tp.group)
        return both[:, :-1], both[:, -1:]

    @classmethod
    def from_dense(
        cls,
        moe_or_state_dict: MoEFeedForward | Mapping[str, Tensor],
        *,
        config: MoEConfig | None = None,
        activation: str | None = None,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        grouped_gemm: bool = True,
        device: torch.device | str | None = None,
    ) -> ParallelMoEFeedForward:
        """Split a dense :class:`MoEFeedForward` (its config and activation are kept unless given) or a
        full state dict (keys of :func:`moe_shapes`; ``config`` required, activation ``silu`` unless given).

        Each rank copies only its slices; ``device`` defaults to the tensors'. The global RNG is not touched.
        """
        if isinstance(moe_or_state_dict, MoEFeedForward):
            sd: Mapping[str, Tensor] = moe_or_state_dict.state_dict()
            config = config or moe_or_state_dict.config
            activation = activation or moe_or_state_dict.activation
        elif isinstance(moe_or_state_dict, Mapping):
            if config is None:
                raise ValueError(
                    "config: expected an MoEConfig with a state dict (routing cannot be read off tensors), got None"
                )
            sd, activation = moe_or_state_dict, activation or "silu"
        else:
            raise TypeError(
                f"moe_or_state_dict: expected an MoEFeedForward or a state dict, got {type(moe_or_state_dict).__name__}"
            )
        w1 = sd.get("experts.w1")
        if not isinstance(w1, Tensor) or w1.dim() != 3:
            got = "no such key" if w1 is None else f"{type(w1).__name__} {tuple(getattr(w1, 'shape', ()))}"
            raise ValueError(f"moe_or_state_dict: expected a 3-D 'experts.w1' [E, I, dim], got {got}")
        module = cls(
            w1.shape[-1], config, activation=activation, group=group, sequence_parallel=sequence_parallel,
            sequence_dim=sequence_dim, grouped_gemm=grouped_gemm, dtype=w1.dtype, device="meta",
        )  # fmt: skip
        module.load_dense_state_dict(sd, device=w1.device if device is None else device)
        return module

    @torch.no_grad()
    def load_dense_state_dict(self, sd: Mapping[str, Tensor], *, device: torch.device | str | None = None) -> None:
        """Load this rank's slices of a full state dict (keys of :func:`moe_shapes`).

        Every key and shape is checked before anything is written, so a bad state dict leaves the module
        as it was. Tensors on the ``meta`` device are replaced (on ``device``, default the source's);
        others are copied into, on their own device.
        """
        _check_moe_state_dict(sd, moe_shapes(self.dim, self.config), "sd")
        for key, value in sd.items():
            if key.startswith("shared_expert."):
                continue
            value = shard_spec_of(self, key, value).take(value, name=f"sd[{key!r}]")
            module_name, _, attr = key.rpartition(".")
            self._assign(self.get_submodule(module_name), attr, value, device)
        if self.shared_expert is not None:
            prefix = "shared_expert."
            shared = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            self.shared_expert.load_dense_state_dict(shared, device=device)

    @staticmethod
    def _assign(module: nn.Module, attr: str, value: Tensor, device: torch.device | str | None) -> None:
        current: Tensor = getattr(module, attr)
        if current.device.type != "meta":
            current.copy_(value)
            return
        target = value.device if device is None else torch.device(device)
        value = value.to(device=target, dtype=current.dtype, copy=True)
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
        else:
            setattr(module, attr, value)  # a registered buffer stays registered

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, Tensor]:
        """The full tensors gathered from every rank, keys of :func:`moe_shapes`, identical on every rank.

        Collective: every rank of the group must call it.
        """
        group = self.tp.group
        shared = {} if self.shared_expert is None else self.shared_expert.dense_state_dict()
        out = {}
        for key in moe_shapes(self.dim, self.config):
            if key.startswith("shared_expert."):
                out[key] = shared[key[len("shared_expert.") :]]
                continue
            value = (
                self.get_parameter(key)
                if key != "router.e_score_correction_bias"
                else self.router.e_score_correction_bias
            )
            value = all_gather_shard(value.detach(), shard_spec_of(self, key, value), group)
            out[key] = value.detach().clone(memory_format=torch.contiguous_format)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, hidden_dim={c.hidden_dim}, shared_hidden_dim={c.shared_hidden_dim}, "
            f"activation={self.activation!r}, rank={self.tp.rank}/{self.tp.size}, sequence_parallel={self.sequence_parallel}"
        )
