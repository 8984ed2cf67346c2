"""Column- and row-parallel linear layers (Megatron / fairscale layout) on an explicit group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .comm import (
    copy_to_parallel,
    gather_from_parallel,
    gather_from_sequence,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
    scatter_to_parallel,
)
from .groups import GroupLike, TPGroup, resolve_group
from .init import init_linear_shard_
from .sharding import ShardSpec
from .swiglu import compute_dtype

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "check_features", "check_input"]


def check_features(name: str, value: int, *, at_least: int = 1) -> int:
    """Validate a size argument: a plain int >= ``at_least``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if value < at_least:
        raise ValueError(f"{name}: expected an int >= {at_least}, got {value}")
    return value


def check_input(
    x: Tensor, weight: Tensor, features: int, *, what: str, name: str = "x", sequence_dim: int | None = None
) -> None:
    """Raise a clear error when ``x`` cannot be multiplied by ``weight``.

    ``features`` is the expected last dimension (``what`` says what it is). The dtype must match the
    weights' unless autocast is on for ``x``'s device. With ``sequence_dim`` (sequence parallelism)
    ``x`` must have that dimension besides the last one.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{name}: expected last dimension {features} ({what}), got shape {tuple(x.shape)}")
    ndim = x.dim()
    if sequence_dim is not None and (not -ndim <= sequence_dim < ndim or sequence_dim % ndim == ndim - 1):
        raise ValueError(
            f"{name}: sequence parallelism needs a sequence dimension {sequence_dim} other than the last (features), "
            f"got shape {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"{name}: expected a tensor on {weight.device} (the weights' device), got one on {x.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: expected dtype {weight.dtype} (the weights' dtype; or run under torch.autocast), got {x.dtype}"
        )


class _ParallelLinear(nn.Module):
    """What both layers share: the resolved group, the shard description, the parameters and their init."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        shard_dim: int,
        parts: Sequence[int] | None,
        group: GroupLike,
        sequence_parallel: bool,
        sequence_dim: int,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.in_features = check_features("in_features", in_features)
        self.out_features = check_features("out_features", out_features)
        self.tp: TPGroup = resolve_group(group)
        self.sequence_parallel = bool(sequence_parallel)
        if isinstance(sequence_dim, bool) or not isinstance(sequence_dim, int):
            raise TypeError(f"sequence_dim: expected an int, got {type(sequence_dim).__name__} ({sequence_dim!r})")
        self.sequence_dim = sequence_dim
        side = "out_features" if shard_dim == 0 else "in_features"
        sharded = out_features if shard_dim == 0 else in_features
        parts = (sharded,) if parts is None else tuple(parts)
        if not parts or any(isinstance(n, bool) or not isinstance(n, int) for n in parts) or sum(parts) != sharded:
            raise ValueError(f"parts: expected ints adding up to {side}={sharded}, got {parts}")
        if min(parts) < self.tp.size:
            what = f"{side}" if len(parts) == 1 else f"every part of {side} {parts}"
            got = sharded if len(parts) == 1 else min(parts)
            raise ValueError(
                f"{what}: expected at least one per rank (>= the tensor-parallel size {self.tp.size}), got {got}"
            )
        self.shard_dim = shard_dim
        self._weight_spec = ShardSpec.split((out_features, in_features), shard_dim, self.tp.rank, self.tp.size, parts)
        self.shard_sizes: list[int] = self._weight_spec.rank_sizes or []
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self._weight_spec.local_shape, **kw))
        bias_len = self._weight_spec.local_shape[0]
        self.bias = nn.Parameter(torch.empty(bias_len, **kw)) if bias else None
        self.reset_parameters()

    def shard_spec(self, name: str) -> ShardSpec:
        """How parameter ``name`` (``"weight"`` or ``"bias"``) is split over the group."""
        if name == "weight":
            return self._weight_spec
        if name == "bias" and self.bias is not None:
            if self.shard_dim == 0:
                spec = self._weight_spec
                return ShardSpec.split((self.out_features,), 0, spec.rank, spec.world, spec.parts)
            return ShardSpec.replicated((self.out_features,))
        raise KeyError(f"{type(self).__name__} has no parameter {name!r}")

    def _single_block(self) -> tuple[int, int]:
        blocks = self._weight_spec.blocks
        if len(blocks) != 1:
            # Not AttributeError: nn.Module.__getattr__ would replace this message with "no attribute".
            raise ValueError(
                f"{type(self).__name__}: holds {len(blocks)} blocks {list(blocks)} of {len(blocks)} parts, not one "
                f"[start, end): read shard_spec('weight').blocks"
            )
        return blocks[0]

    @property
    def start(self) -> int:
        """First index of this rank's block along the split dimension (one part only)."""
        return self._single_block()[0]

    @property
    def end(self) -> int:
        """End (exclusive) of this rank's block along the split dimension (one part only)."""
        return self._single_block()[1]

    @property
    def group(self) -> ProcessGroup | None:
        return self.tp.group

    @property
    def active_sequence_dim(self) -> int | None:
        """``sequence_dim`` when the layer works on sequence shards (SP over more than one rank)."""
        return self.sequence_dim if self.sequence_parallel and self.tp.size > 1 else None

    def reset_parameters(self) -> None:
        """Draw this rank's shard of what ``nn.Linear(in, out)`` would draw (see ``tp_ffn.init``)."""
        init_linear_shard_(
            self.weight, self.bias, self.in_features, self.out_features,
            dim=self.shard_dim, blocks=self._weight_spec.blocks,
        )  # fmt: skip

    def extra_repr(self) -> str:
        blocks = ", ".join(f"[{s}, {e})" for s, e in self._weight_spec.blocks)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"shard={blocks} rank={self.tp.rank}/{self.tp.size}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with ``A`` split by rows (output features) over the group.

    Rank r of W holds rows ``[start_r, end_r)`` (``torch.tensor_split`` sizes, ``n_r = end_r - start_r``):

    ==========================  ==========================================
    ``weight``                  ``[n_r, in]``
    ``bias``                    ``[n_r]``
    ``x``                       ``[*, in]``; sequence parallel: ``[b, s/W, in]`` (along ``sequence_dim``)
    ``y`` (``gather_output``)   ``[*, out]``; sequence parallel: ``[b, s, out]`` (e.g. an output head)
    ``y`` (otherwise)           ``[*, n_r]``; sequence parallel: ``[b, s, n_r]``
    ==========================  ==========================================

    Forward communication: none, or one all-gather of the sequence shards with
    ``sequence_parallel``, plus one all-gather of the outputs with ``gather_output``. Backward: one
    all-reduce (reduce-scatter with sequence parallelism) of the input gradient.

    ``parts`` (e.g. ``(I, I)`` for a fused gate/up weight ``[2I, in]``): the output features are
    these consecutive parts, each split over the group; rank r holds its rows of every part, one
    part after the other (``weight [n_r(I) + n_r(I), in]``, ``y`` likewise), and ``gather_output``
    puts every part back in place. :meth:`shard_spec` says it to loaders and checkpoints.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        gather_output: bool = True,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        parts: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, shard_dim=0, parts=parts, group=group,
            sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, dtype=dtype, device=device,
        )  # fmt: skip
        self.gather_output = bool(gather_output)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.weight, self.in_features, what="in_features", sequence_dim=self.active_sequence_dim)
        group = self.tp.group
        if self.sequence_parallel:
            # Cast before the all-gather where autocast would cast the gathered input anyway: the same
            # values in the compute dtype's bytes (and the gradient's reduce-scatter carries them too).
            x = gather_from_sequence(x, group, self.sequence_dim, dtype=compute_dtype(x))
        else:
            x = copy_to_parallel(x, group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            # Rank order; with several parts, each part's blocks are then put back in place.
            y = self._weight_spec.assemble(gather_from_parallel(y, group, -1, self.shard_sizes), -1)
        return y


class RowParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with ``A`` split by columns (input features) over the group.

    Rank r of W holds columns ``[start_r, end_r)`` (``torch.tensor_split`` sizes, ``n_r = end_r - start_r``):

    ==============================  ==========================================
    ``weight``                      ``[out, n_r]``
    ``bias``                        ``[out]``, whole, added once after the reduction
    ``x`` (``input_is_parallel``)   ``[*, n_r]``
    ``x`` (otherwise)               ``[*, in]``, this rank's columns are taken
    ``y``                           ``[*, out]``; sequence parallel: ``[b, s/W, out]``
    ==============================  ==========================================

    Forward communication: one all-reduce of the partial products, or one reduce-scatter along
    ``sequence_dim`` with ``sequence_parallel``. Backward: none, or one all-gather with sequence
    parallelism plus one all-reduce of the bias gradient (each rank's bias sees only its own tokens).

    ``parts``: the input features as consecutive parts, each split over the group (rank r holds its
    columns of every part, one after the other); needs ``input_is_parallel``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_is_parallel: bool = False,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 1,
        parts: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if parts is not None and len(parts) > 1 and not input_is_parallel:
            raise ValueError(
                f"input_is_parallel: expected True with several parts {tuple(parts)} (a full input would have to be "
                "cut block by block), got False"
            )
        if sequence_parallel and not input_is_parallel:
            raise ValueError(
                "input_is_parallel: expected True with sequence_parallel=True (the input comes from a "
                "column-parallel layer), got False"
            )
        super().__init__(
            in_features, out_features, bias, shard_dim=1, parts=parts, group=group,
            sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, dtype=dtype, device=device,
        )  # fmt: skip
        self.input_is_parallel = bool(input_is_parallel)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_is_parallel:
            blocks = ", ".join(f"[{s}, {e})" for s, e in self._weight_spec.blocks)
            n = self._weight_spec.local_size
            shard = f"this rank's in_features shard {blocks}"
            check_input(x, self.weight, n, what=shard, sequence_dim=self.active_sequence_dim)
        else:
            check_input(x, self.weight, self.in_features, what="in_features")
        return self.forward_parallel(
            x if self.input_is_parallel else scatter_to_parallel(x, self.tp.group, -1, self.shard_sizes)
        )

    def forward_parallel(self, x: Tensor) -> Tensor:
        """The product of an input already split by features ``[*, n_r]`` (no checks)."""
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        return self.reduce_partial(F.linear(x, self.weight))

    def reduce_partial(self, y: Tensor) -> Tensor:
        """Finish this rank's partial product ``y = x_r A_r^T [*, out]`` (no bias yet): sum it over the
        group (reduce-scatter along ``sequence_dim`` with sequence parallelism) and add the bias once.

        ``y`` must be a tensor nothing else holds (the output of the GEMM just before): it is
        reduced in place.
        """
        group, bias = self.tp.group, self.bias
        if self.tp.size > 1 and self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, group, self.sequence_dim)
            # Each rank's tokens see the whole bias: all-reduce its gradient in backward.
            bias = None if bias is None else copy_to_parallel(bias, group)
        elif self.tp.size > 1:
            y = reduce_from_parallel(y, group, inplace=True)
        # Under autocast y is in the autocast dtype: add the bias in it, as F.linear would.
        return y if bias is None else y + bias.to(y.dtype)
