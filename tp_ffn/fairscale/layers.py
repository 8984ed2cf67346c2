"""fairscale's model-parallel layers on tp_ffn: ``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``, ``ParallelEmbedding``.

Same constructor signatures, state-dict keys and shapes, forward semantics and initialisation as
fairscale 0.4.13, so that Meta's Llama code runs on them unchanged. Each layer reads the
model-parallel group from :mod:`tp_ffn.fairscale.initialize` once, at construction; the linear
layers are tp_ffn's own (:mod:`tp_ffn.layers`), the embeddings use tp_ffn's collectives.

Per rank r of W (``[s_r, e_r)`` this rank's block, ``n_r = e_r - s_r``)::

    ColumnParallelLinear(in, out)      weight [n_r, in]   bias [n_r]    rows [s_r, e_r) of out
    RowParallelLinear(in, out)         weight [out, n_r]  bias [out]    columns [s_r, e_r) of in
    VocabParallelEmbedding(num, dim)   weight [n_r, dim]                rows [s_r, e_r) of num
    ParallelEmbedding(num, dim)        weight [num, n_r]                columns [s_r, e_r) of dim

Where fairscale asserts that the split dimension is divisible by W, these layers split it like
``torch.tensor_split`` (the first ``size % W`` ranks hold one more); with divisible sizes the blocks
are fairscale's. ``stride > 1`` still needs equal blocks.

Initialisation (fairscale's ``_initialize_affine_weight``): ``init_method`` fills the full master
weight ``[out, in]`` (``[num, dim]`` for the embeddings) on every rank and each rank keeps its
block, so with the same seed the weights are fairscale's, whatever W. Biases start at zero. The
default is ``torch.nn.init.xavier_normal_``; Meta's code passes ``init_method=lambda x: x`` (nothing
drawn: the weights are loaded afterwards). Parameters take torch's default dtype and device unless
``dtype`` / ``device`` (keywords fairscale does not have) are given; on the ``meta`` device nothing
is drawn.

Differences from fairscale, all towards ``torch.nn.Embedding``'s semantics: ``padding_idx`` is a
vocabulary index (fairscale's ``VocabParallelEmbedding`` applies it to each rank's local rows);
``max_norm`` renormalises exactly the rows looked up, by their full norm (fairscale renormalises
rank-local pieces and, in ``ParallelEmbedding``, uses ``scale_grad_by_freq`` as the norm type);
``scale_grad_by_freq`` counts only real occurrences; out-of-range token ids raise ``IndexError``
(fairscale's vocabulary-parallel lookup returns zeros for them). ``keep_master_weight_for_test``
keeps the master weight as a plain tensor attribute, ``master_weight`` (fairscale at W = 1 makes it
a second registered parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from .. import layers as core
from ..comm import all_gather_shard, gather_from_parallel, reduce_from_parallel
from ..groups import TPGroup, resolve_group
from ..sharding import ShardSpec
from .initialize import get_model_parallel_group

__all__ = ["ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear", "VocabParallelEmbedding"]

InitMethod = Callable[[Tensor], Any]


def _check_stride(stride: int, sizes: list[int]) -> int:
    """fairscale's ``stride``: each rank's block is ``stride`` pieces, taken round-robin from the master."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    if stride > 1 and (len(set(sizes)) > 1 or sizes[0] % stride):
        raise ValueError(
            f"stride: {stride} needs every rank's block to be the same size and divisible by it, got block "
            f"sizes {sizes}"
        )
    return stride


@torch.no_grad()
def _init_from_master(weight: Tensor, drawn: ShardSpec, init_method: InitMethod) -> Tensor | None:
    """Fill ``weight`` with this rank's pieces ``drawn`` of a master (``drawn.shape``) drawn by ``init_method``.

    As fairscale: at W = 1 ``init_method`` fills ``weight`` itself; otherwise it fills a master of
    the weight's dtype on the weight's device and the rank keeps its pieces of it. Returns the
    master (``None`` on the meta device, where nothing is drawn).
    """
    if weight.device.type == "meta":
        return None
    if drawn.world == 1:
        init_method(weight)
        return weight.detach()
    master = torch.empty(drawn.shape, dtype=weight.dtype, device=weight.device)
    init_method(master)
    weight.copy_(drawn.take(master))
    return master


class _MasterInit:
    """fairscale's initialisation, and ``get_master_weight``, for a layer with one sharded ``weight``.

    The layer has ``weight``, ``tp``, ``shard_spec("weight")`` and ``master_shape``. ``init_method``
    is ``None`` while tp_ffn's linear constructor runs: it calls ``reset_parameters``, which must draw
    nothing before the fairscale constructor has set it.
    """

    init_method: InitMethod | None = None

    @property
    def master_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``; the embeddings' ``(num_embeddings, embedding_dim)``."""
        return self.out_features, self.in_features

    def _init_like_fairscale(self, init_method: InitMethod, stride: int, keep_master_weight_for_test: bool) -> None:
        self.stride = _check_stride(stride, self.shard_sizes)
        self.keep_master_weight_for_test = bool(keep_master_weight_for_test)
        self.init_method = init_method
        self.reset_parameters()

    def _drawn_spec(self) -> ShardSpec:
        """Where this rank's weight is drawn from in the master: its block, or with ``stride`` k its
        block of each of k equal parts (fairscale's ``_initialize_affine_weight``). Only the draw is
        strided: the layer computes, and ``get_master_weight`` gathers, in rank order, as fairscale's."""
        spec = self.shard_spec("weight")
        if self.stride == 1:
            return spec
        n = spec.shape[spec.dim]
        return ShardSpec.split(spec.shape, spec.dim, spec.rank, spec.world, (n // self.stride,) * self.stride)

    def reset_parameters(self) -> None:
        """Draw the master weight with ``init_method``, keep this rank's block, zero the bias."""
        if self.init_method is None:
            return
        master = _init_from_master(self.weight, self._drawn_spec(), self.init_method)
        bias = getattr(self, "bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()
        self.master_weight = master if self.keep_master_weight_for_test else None

    def get_master_weight(self) -> Tensor:
        """The full weight (``master_shape``), gathered from every rank (a collective)."""
        return all_gather_shard(self.weight.detach(), self.shard_spec("weight"), self.tp.group)


class ColumnParallelLinear(_MasterInit, core.ColumnParallelLinear):
    """fairscale's ``ColumnParallelLinear(in, out, bias, gather_output, init_method, stride,
    keep_master_weight_for_test)``.

    ``y = x A^T + b`` with ``A [out, in]`` split by rows: ``x [*, in]`` -> ``y [*, n_r]``, or
    ``[*, out]`` with ``gather_output`` (one all-gather). Backward all-reduces the input gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = True,
        init_method: InitMethod = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, gather_output=gather_output, group=get_model_parallel_group(),
            dtype=dtype, device=device,
        )  # fmt: skip
        self._init_like_fairscale(init_method, stride, keep_master_weight_for_test)

    @property
    def output_size_per_partition(self) -> int:
        return self.end - self.start

    def forward(self, input_: Tensor) -> Tensor:
        y = super().forward(input_)
        # tp_ffn's gather returns a strided view; fairscale's torch.cat a contiguous tensor, and the
        # next reductions (a norm, a softmax) then sum in the same order as they would after fairscale.
        return y.contiguous() if self.gather_output else y


class RowParallelLinear(_MasterInit, core.RowParallelLinear):
    """fairscale's ``RowParallelLinear(in, out, bias, input_is_parallel, init_method, stride,
    keep_master_weight_for_test)``.

    ``y = x A^T + b`` with ``A [out, in]`` split by columns: ``x [*, n_r]`` with
    ``input_is_parallel``, else ``x [*, in]`` of which this rank takes its columns; one all-reduce of
    the partial products, then the whole bias, once: ``y [*, out]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: InitMethod = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, input_is_parallel=input_is_parallel, group=get_model_parallel_group(),
            dtype=dtype, device=device,
        )  # fmt: skip
        self._init_like_fairscale(init_method, stride, keep_master_weight_for_test)

    @property
    def input_size_per_partition(self) -> int:
        return self.end - self.start


def _check_ids(ids: Tensor, num_embeddings: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        what = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"input: expected a tensor of token ids (int64 or int32), got {what}")
    # Dense nn.Embedding raises for these; a sharded lookup would quietly return zeros.
    if not torch.compiler.is_compiling() and ids.numel() and (ids.min() < 0 or ids.max() >= num_embeddings):
        raise IndexError(
            f"input: token ids must lie in [0, {num_embeddings}), got ids from {ids.min().item()} to {ids.max().item()}"
        )


def _normalise_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx: expected an index in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


class _ParallelEmbedding(_MasterInit, nn.Module):
    """What both embeddings share: nn.Embedding's options, the group, this rank's block, fairscale's init."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
        scale_grad_by_freq: bool,
        sparse: bool,
        init_method: InitMethod,
        keep_master_weight_for_test: bool,
        *,
        shard_dim: int,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.num_embeddings = core.check_features("num_embeddings", num_embeddings)
        self.embedding_dim = core.check_features("embedding_dim", embedding_dim)
        self.padding_idx = _normalise_padding_idx(padding_idx, num_embeddings)
        if max_norm is not None and not norm_type > 0:
            raise ValueError(f"norm_type: expected a positive p-norm with max_norm, got {norm_type}")
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = bool(scale_grad_by_freq), bool(sparse)
        self.tp: TPGroup = resolve_group(get_model_parallel_group())
        split = (num_embeddings, embedding_dim)[shard_dim]
        if split < self.tp.size:
            side = ("num_embeddings", "embedding_dim")[shard_dim]
            raise ValueError(
                f"{side}: expected at least one per rank (>= the model-parallel size {self.tp.size}), got {split}"
            )
        self.shard_dim = shard_dim
        self._weight_spec = ShardSpec.split((num_embeddings, embedding_dim), shard_dim, self.tp.rank, self.tp.size)
        self.shard_sizes: list[int] = self._weight_spec.rank_sizes or []
        self.start, self.end = self._weight_spec.blocks[0]
        self.weight = nn.Parameter(torch.empty(self._weight_spec.local_shape, dtype=dtype, device=device))
        self._init_like_fairscale(init_method, 1, keep_master_weight_for_test)

    def shard_spec(self, name: str) -> ShardSpec:
        """How ``weight`` is split over the model-parallel group (rows or columns, ``tensor_split`` sizes)."""
        if name != "weight":
            raise KeyError(f"{type(self).__name__} has no parameter {name!r}")
        return self._weight_spec

    @property
    def master_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def extra_repr(self) -> str:
        what = ("num_embeddings", "embedding_dim")[self.shard_dim]
        s = f"{self.num_embeddings}, {self.embedding_dim}, {what} shard=[{self.start}, {self.end}) "
        s += f"rank={self.tp.rank}/{self.tp.size}"
        for name in ("padding_idx", "max_norm"):
            if getattr(self, name) is not None:
                s += f", {name}={getattr(self, name)}"
        return s


class VocabParallelEmbedding(_ParallelEmbedding):
    """fairscale's ``VocabParallelEmbedding(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
    scale_grad_by_freq, sparse, init_method)``: Llama 3's ``tok_embeddings``.

    Rank r holds vocabulary rows ``[vocab_start_index, vocab_end_index)``: ``weight [n_r, dim]``.
    ``ids [*]`` -> each rank looks up the ids it holds (zeros elsewhere) -> one all-reduce ->
    ``[*, dim]``. Backward: each rank's weight gets the gradients of its own ids; none flows to the ids.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_method: InitMethod = init.xavier_normal_,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            init_method, False, shard_dim=0, dtype=dtype, device=device,
        )  # fmt: skip

    @property
    def vocab_start_index(self) -> int:
        return self.start

    @property
    def vocab_end_index(self) -> int:
        return self.end

    @property
    def num_embeddings_per_partition(self) -> int:
        return self.end - self.start

    def forward(self, input_: Tensor) -> Tensor:
        _check_ids(input_, self.num_embeddings)
        pad = self.padding_idx
        local_pad = pad - self.start if pad is not None and self.start <= pad < self.end else None
        outside = (input_ < self.start) | (input_ >= self.end)
        if self.max_norm is None and not self.scale_grad_by_freq:
            # Ids held elsewhere look up row 0 and are zeroed: no data-dependent shapes.
            local = (input_ - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight, local_pad, sparse=self.sparse)
            out = out.masked_fill(outside.unsqueeze(-1), 0)
        else:
            # Renorming or counting row 0 for every foreign id would be wrong: look up only our own ids.
            mine = ~outside
            found = F.embedding(
                input_[mine] - self.start, self.weight, local_pad, self.max_norm, self.norm_type,
                self.scale_grad_by_freq, self.sparse,
            )  # fmt: skip
            out = found.new_zeros((*input_.shape, self.embedding_dim)).index_put((mine,), found)
        return reduce_from_parallel(out, self.tp.group, inplace=True)  # out is this function's own buffer


class ParallelEmbedding(_ParallelEmbedding):
    """fairscale's ``ParallelEmbedding(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
    scale_grad_by_freq, sparse, init_method, keep_master_weight_for_test)``: Llama 1/2's ``tok_embeddings``.

    Rank r holds embedding columns ``[s_r, e_r)`` of every row: ``weight [num, n_r]``.
    ``ids [*]`` -> ``[*, n_r]`` -> one all-gather -> ``[*, dim]``. Backward keeps this rank's columns
    of the output gradient.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_method: InitMethod = init.xavier_normal_,
        keep_master_weight_for_test: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            init_method, keep_master_weight_for_test, shard_dim=1, dtype=dtype, device=device,
        )  # fmt: skip

    @property
    def embedding_dim_per_partition(self) -> int:
        return self.end - self.start

    @torch.no_grad()
    def _renorm_(self, ids: Tensor) -> None:
        """``nn.Embedding``'s ``max_norm`` on the rows ``ids`` use, by their norm over all ranks' columns."""
        rows = ids.unique()
        piece = self.weight[rows].abs()
        inf = self.norm_type == float("inf")
        if inf:
            norm = piece.amax(-1)
            if self.tp.size > 1:
                dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=self.tp.group)
        else:
            norm = piece.pow(self.norm_type).sum(-1)
            if self.tp.size > 1:
                dist.all_reduce(norm, group=self.tp.group)
            norm = norm.pow(1.0 / self.norm_type)
        # torch's embedding_renorm_: rows longer than max_norm are scaled by max_norm / (norm + 1e-7).
        scale = (self.max_norm / (norm + 1e-7)).masked_fill(norm <= self.max_norm, 1.0)
        self.weight[rows] *= scale.unsqueeze(-1)

    def forward(self, input_: Tensor) -> Tensor:
        _check_ids(input_, self.num_embeddings)
        if self.max_norm is not None:
            self._renorm_(input_)
        out = F.embedding(input_, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        # Contiguous, as fairscale's torch.cat (see ColumnParallelLinear.forward).
        return gather_from_parallel(out, self.tp.group, -1, self.shard_sizes).contiguous()
