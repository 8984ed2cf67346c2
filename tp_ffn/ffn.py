"""The SwiGLU feed-forward block, dense and tensor-parallel, and Meta's hidden-size rule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import canonical_ffn_state_dict, check_ffn_state_dict, ffn_shapes, infer_ffn_dims
from .comm import all_gather_shard, copy_all_to_parallel, copy_to_parallel, gather_from_sequence
from .fused import gate_up_projection, row_parallel_chunked
from .groups import GroupLike, resolve_group
from .layers import ColumnParallelLinear, RowParallelLinear, check_features, check_input
from .lowrank import LowRank, column_term, low_rank_terms, parallel_layer, row_term
from .swiglu import ACTIVATIONS, compute_dtype, get_activation, swiglu_linear

__all__ = ["ACTIVATIONS", "FeedForward", "ParallelFeedForward", "get_activation", "llama_ffn_hidden_dim"]


def llama_ffn_hidden_dim(
    dim: int, *, hidden_dim: int | None = None, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    """Meta's Llama rule for the intermediate size, with both ``int()`` truncations of Meta's code.

    ``h = int(2 * hidden_dim / 3)`` (``hidden_dim`` defaults to ``4 * dim``), then
    ``h = int(ffn_dim_multiplier * h)`` if given, then ``h`` rounded up to a multiple of ``multiple_of``.
    Llama-2-7B: ``llama_ffn_hidden_dim(4096) == 11008``; Llama-3-8B:
    ``llama_ffn_hidden_dim(4096, ffn_dim_multiplier=1.3, multiple_of=1024) == 14336``.
    """
    check_features("dim", dim)
    check_features("multiple_of", multiple_of)
    h = 4 * dim if hidden_dim is None else check_features("hidden_dim", hidden_dim)
    h = int(2 * h / 3)
    if ffn_dim_multiplier is not None:
        if (
            isinstance(ffn_dim_multiplier, bool)
            or not isinstance(ffn_dim_multiplier, (int, float))
            or ffn_dim_multiplier <= 0
        ):
            raise ValueError(f"ffn_dim_multiplier: expected a positive number or None, got {ffn_dim_multiplier!r}")
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """Dense SwiGLU block ``w2(act(w1 x) * w3 x)``; no parallel code.

    ``w1, w3: [hidden_dim, dim]``, ``w2: [dim, hidden_dim]``; ``x [*, dim] -> [*, dim]``.
    ``hidden_dim`` is the final intermediate size (HF's ``intermediate_size``; see
    :func:`llama_ffn_hidden_dim` for Meta's rule).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        bias: bool = False,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_features("dim", dim)
        self.hidden_dim = check_features("hidden_dim", hidden_dim)
        self.act = get_activation(activation)
        self.activation = activation
        kw = {"bias": bias, "dtype": dtype, "device": device}
        self.w1 = nn.Linear(dim, hidden_dim, **kw)
        self.w2 = nn.Linear(hidden_dim, dim, **kw)
        self.w3 = nn.Linear(dim, hidden_dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.w1.weight, self.dim, what="dim")
        return self.w2(self.act(self.w1(x)) * self.w3(x))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], *, activation: str = "silu") -> FeedForward:
        """Build from a full state dict with Meta (``w1/w2/w3``) or HF (``gate/up/down_proj``) keys.

        ``dim``, ``hidden_dim``, bias, dtype and device come from the tensors, which are copied.
        """
        canonical, original = canonical_ffn_state_dict(sd, "sd")
        dim, hidden_dim, bias = infer_ffn_dims(canonical, original, "sd")
        ffn = cls(dim, hidden_dim, bias=bias, activation=activation, dtype=canonical["w1.weight"].dtype, device="meta")
        # One dtype for the module, w1's (as from_dense does): mixed dtypes would fail in F.linear.
        dtype = canonical["w1.weight"].dtype
        ffn.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in canonical.items()}, assign=True)
        return ffn

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class ParallelFeedForward(nn.Module):
    """The SwiGLU block split over a tensor-parallel group as in Meta's Llama code.

    Rank r of W holds rows ``[start_r, end_r)`` of w1/w3 and the same columns of w2
    (``n_r = end_r - start_r``, ``torch.tensor_split`` sizes; first ``hidden % W`` ranks hold one more)::

        x [*, dim] --copy--+--> w1 [n_r, dim] --act--+
                           |                          *--> h [*, n_r] --> w2 [dim, n_r] --all-reduce--> [*, dim]
                           +--> w3 [n_r, dim] -------+

    Forward: one all-reduce. Backward: one all-reduce of the input gradient (w1 and w3 share one
    copy-to-parallel region). With ``sequence_parallel`` the input and output are ``[b, s/W, dim]``
    shards along ``sequence_dim``: one all-gather on entry and one reduce-scatter on exit, and in
    backward one reduce-scatter, one all-gather and (with bias) one all-reduce of w2's bias gradient.

    Execution modes (numerically equivalent; the weights and state-dict layout do not change):
    ``fuse_gate_up`` computes w1 and w3 as one GEMM on their concatenated shards (and one GEMM each
    for their input and weight gradients); ``overlap_comm`` runs the input-gradient collective
    during the weight-gradient GEMMs; ``comm_chunks > 1`` (not with sequence parallelism) splits the
    down projection into token chunks whose all-reduces overlap the next chunk's GEMM, so the
    forward issues ``comm_chunks`` all-reduces carrying the bytes of one.

    Low-rank terms (LoRA): a projection slot may hold a wrapper around its parallel layer that supplies
    ``low_rank_terms()`` (PEFT's LoRA through :mod:`tp_ffn.peft`); the block then adds them in its own
    forward, sharded as the projection, with the same one forward all-reduce (see :mod:`tp_ffn.lowrank`).

    Memory kept for backward (every mode; parameters aside): the input ``x`` once (both projections
    read the same tensor), and ``g = x w1^T`` and ``u = x w3^T`` — ``dim + 2 n_r`` elements per
    token. The gated product ``act(g) * u`` and the down projection are one autograd function
    (:func:`~tp_ffn.swiglu.swiglu_linear`) that recomputes ``act(g)``, its derivative and the
    product from ``g`` and ``u`` in backward, where autograd would keep ``act(g)`` and the
    product as well (``dim + 4 n_r``, as :class:`FeedForward` does). With sequence parallelism the
    input kept is the gathered ``[b, s, dim]`` the GEMMs read, so per token of the full sequence it
    is again ``dim + 2 n_r`` (per local token ``W (dim + 2 n_r)``, since ``g`` and ``u`` span the
    full sequence anyway). Keeping only the local ``[b, s/W, dim]`` shard would lower that to
    ``dim / W + 2 n_r`` at the price of a second all-gather of the input in backward (Megatron's
    choice); this block does not.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        bias: bool = False,
        activation: str = "silu",
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        fuse_gate_up: bool = False,
        overlap_comm: bool = True,
        comm_chunks: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_features("dim", dim)
        self.hidden_dim = check_features("hidden_dim", hidden_dim)
        self.act = get_activation(activation)
        self.activation = activation
        self.fuse_gate_up, self.overlap_comm = bool(fuse_gate_up), bool(overlap_comm)
        self.comm_chunks = check_features("comm_chunks", comm_chunks)
        if comm_chunks > 1 and sequence_parallel:
            raise ValueError(
                "comm_chunks: expected 1 with sequence_parallel=True (chunking splits the all-reduce), "
                f"got {comm_chunks}"
            )
        world = resolve_group(group).size
        if hidden_dim < world:
            raise ValueError(
                f"hidden_dim: expected at least one row per rank (>= the tensor-parallel size {world}), "
                f"got {hidden_dim}"
            )
        kw = {
            "group": group,
            "sequence_parallel": sequence_parallel,
            "sequence_dim": sequence_dim,
            "dtype": dtype,
            "device": device,
        }
        # Built in the dense block's order (w1, w2, w3) so that both draw the same random stream.
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias, gather_output=False, **kw)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias, input_is_parallel=True, **kw)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias, gather_output=False, **kw)
        self.tp = self.w1.tp
        self.sequence_parallel = self.w1.sequence_parallel
        self.sequence_dim = sequence_dim

    def layers(self) -> tuple[ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear]:
        """``(w1, w2, w3)`` as parallel layers, also where a wrapper (a LoRA layer, see :mod:`tp_ffn.lowrank`)
        holds one in its slot."""
        return parallel_layer(self.w1), parallel_layer(self.w2), parallel_layer(self.w3)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        w1, w2, w3 = self.layers()
        check_input(x, w1.weight, self.dim, what="dim", sequence_dim=w1.active_sequence_dim)
        terms = (low_rank_terms(self.w1), low_rank_terms(self.w3), low_rank_terms(self.w2))
        if any(terms):
            return self._forward_low_rank(x, *terms)
        group = self.tp.group
        if self.fuse_gate_up or self.overlap_comm:
            seq_dim = self.sequence_dim if self.sequence_parallel else None
            g, u = gate_up_projection(
                x, w1.weight, w3.weight, w1.bias, w3.bias, group,
                sequence_dim=seq_dim, fused=self.fuse_gate_up, overlap=self.overlap_comm,
            )  # fmt: skip
        else:
            # The reference path: one region for both column-parallel GEMMs, so a single
            # all-reduce (SP: reduce-scatter) of the input gradient.
            # Cast once (under autocast each F.linear would make, and keep for backward, a copy of its
            # own); under SP before the all-gather, which then carries the compute dtype.
            dtype = compute_dtype(x)
            if self.sequence_parallel:
                x = gather_from_sequence(x, group, self.sequence_dim, dtype=dtype)
            else:
                x = copy_to_parallel(x, group).to(dtype)
            x = x.contiguous()
            g, u = F.linear(x, w1.weight, w1.bias), F.linear(x, w3.weight, w3.bias)
        # act(g) * u and the down projection in one function that keeps only g and u for backward.
        if self.comm_chunks > 1 and self.tp.size > 1:
            y = row_parallel_chunked(g, u, w2.weight, self.activation, group, self.comm_chunks)
            return y if w2.bias is None else y + w2.bias.to(y.dtype)
        return w2.reduce_partial(swiglu_linear(g, u, w2.weight, self.activation))

    def _forward_low_rank(
        self, x: Tensor, gate: tuple[LowRank, ...], up: tuple[LowRank, ...], down: tuple[LowRank, ...]
    ) -> Tensor:
        """The block with low-rank terms (:mod:`tp_ffn.lowrank`), on the reference path (two GEMMs; a frozen
        weight gets no weight-gradient GEMM, so there is nothing for ``overlap_comm`` to hide the collective
        behind; ``fuse_gate_up`` and ``comm_chunks`` do not apply). Communication: forward one all-reduce
        (SP: all-gather, reduce-scatter); backward one all-reduce per dtype carrying the input gradient and
        the whole factors' gradients (SP: the reduce-scatter of the input gradient, and the factors' all-reduce).
        """
        w1, w2, w3 = self.layers()
        group = self.tp.group
        wholes = [t.a for t in gate + up] + [t.b for t in down]
        if self.sequence_parallel:
            x = gather_from_sequence(x, group, self.sequence_dim)
            wholes = copy_all_to_parallel(wholes, group)
        else:
            x, *wholes = copy_all_to_parallel([x, *wholes], group)
        n = len(gate) + len(up)
        gate = tuple(replace(t, a=a) for t, a in zip(gate, wholes[: len(gate)]))
        up = tuple(replace(t, a=a) for t, a in zip(up, wholes[len(gate) : n]))
        down = tuple(replace(t, b=b) for t, b in zip(down, wholes[n:]))
        # Contiguous as the dense input is: dropout draws its mask in memory order (a gathered input is strided).
        x = x.contiguous()
        xc = x.to(compute_dtype(x))
        g, u = F.linear(xc, w1.weight, w1.bias), F.linear(xc, w3.weight, w3.bias)
        # The terms in the dense block's order (gate, up, down), so that dropout draws what it draws.
        if gate:
            g = sum((column_term(x, t) for t in gate), g).to(g.dtype)
        if up:
            u = sum((column_term(x, t) for t in up), u).to(u.dtype)
        y = swiglu_linear(g, u, w2.weight, self.activation)
        if down:
            y = sum((row_term(g, u, t, self.activation, w2) for t in down), y).to(y.dtype)
        return w2.reduce_partial(y)

    @classmethod
    def from_dense(
        cls,
        ffn_or_state_dict: FeedForward | Mapping[str, Tensor],
        *,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        activation: str | None = None,
        device: torch.device | str | None = None,
        fuse_gate_up: bool = False,
        overlap_comm: bool = True,
        comm_chunks: int = 1,
    ) -> ParallelFeedForward:
        """Shard a dense :class:`FeedForward` (its activation is kept unless ``activation`` is given)
        or a full state dict (Meta or HF keys; activation ``silu`` unless given).

        Each rank copies only its slices; ``device`` defaults to the tensors' device. The global RNG is
        not touched.
        """
        if isinstance(ffn_or_state_dict, FeedForward):
            sd: Mapping[str, Tensor] = ffn_or_state_dict.state_dict()
            activation = activation or ffn_or_state_dict.activation
        elif isinstance(ffn_or_state_dict, Mapping):
            sd = ffn_or_state_dict
            activation = activation or "silu"
        else:
            raise TypeError(
                f"ffn_or_state_dict: expected a FeedForward or a state dict, got {type(ffn_or_state_dict).__name__}"
            )
        canonical, original = canonical_ffn_state_dict(sd, "ffn_or_state_dict")
        dim, hidden_dim, bias = infer_ffn_dims(canonical, original, "ffn_or_state_dict")
        w1 = canonical["w1.weight"]
        module = cls(
            dim, hidden_dim, bias=bias, activation=activation, group=group,
            sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, fuse_gate_up=fuse_gate_up,
            overlap_comm=overlap_comm, comm_chunks=comm_chunks, dtype=w1.dtype, device="meta",
        )  # fmt: skip
        module.load_dense_state_dict(sd, device=w1.device if device is None else device)
        return module

    def _params(self) -> list[tuple[str, ColumnParallelLinear | RowParallelLinear, str]]:
        """``(Meta key, layer, attribute)`` of every parameter of the block (its layers say how each is split)."""
        layers = zip(("w1", "w2", "w3"), self.layers())
        return [
            (f"{n}.{a}", layer, a) for n, layer in layers for a in ("weight", "bias") if getattr(layer, a) is not None
        ]

    @torch.no_grad()
    def load_dense_state_dict(self, sd: Mapping[str, Tensor], *, device: torch.device | str | None = None) -> None:
        """Load this rank's slices of a full state dict (Meta or HF keys, ``.weight`` / ``.bias``).

        Every key and shape is checked before anything is written, so a bad state dict leaves the
        module as it was. Parameters on the ``meta`` device are replaced by the slices (on ``device``,
        default the tensors' device); others are copied into, on their own device.
        """
        canonical, original = canonical_ffn_state_dict(sd, "sd")
        check_ffn_state_dict(canonical, original, ffn_shapes(self.dim, self.hidden_dim, self.layers()[0].bias is not None), "sd")
        slices = {(layer, attr): layer.shard_spec(attr).take(canonical[key]) for key, layer, attr in self._params()}
        for (layer, attr), value in slices.items():
            param: nn.Parameter = getattr(layer, attr)
            if param.device.type == "meta":
                target = value.device if device is None else torch.device(device)
                value = value.to(device=target, dtype=param.dtype, copy=True)
                setattr(layer, attr, nn.Parameter(value, requires_grad=param.requires_grad))
            else:
                param.copy_(value)

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, Tensor]:
        """The full weights gathered from every rank, Meta keys, identical on every rank.

        Collective: every rank of the group must call it.
        """
        return {k: full for k, (_, full) in self._gathered().items()}

    @torch.no_grad()
    def gather_shards(self) -> list[tuple[Tensor, Tensor]]:
        """``(this rank's parameter, the full tensor)`` for every parameter of the block, as
        :func:`tp_ffn.hf.full_state_dict` asks of every module that holds shards. Collective."""
        return list(self._gathered().values())

    def _gathered(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Meta key -> ``(parameter, full tensor)``, in the order of :func:`~tp_ffn.checkpoint.ffn_shapes`."""
        group = self.tp.group
        out = {}
        for key, layer, attr in self._params():
            p = getattr(layer, attr)
            out[key] = (p, all_gather_shard(p.detach(), layer.shard_spec(attr), group).clone())
        return {k: out[k] for k in ffn_shapes(self.dim, self.hidden_dim, self.layers()[0].bias is not None)}

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
