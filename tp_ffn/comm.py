"""Collectives as autograd functions, each named by what it does forward / backward.

Every function takes the process group explicitly and returns its input untouched when the group
has one rank (or is ``None``), so a single process pays nothing.

Buffers: every collective writes into a buffer of its own and never into its input or into the
gradient autograd hands it (which the caller or another branch may still hold), except where the
caller owns the input and says so (``reduce_from_parallel(..., inplace=True)`` on a GEMM output
that nothing else references). Use the returned tensor.

============================  ====================  ====================
function                      forward               backward
============================  ====================  ====================
``copy_to_parallel``          identity              all-reduce
``copy_all_to_parallel``      identity              one all-reduce of all the gradients (per dtype)
``reduce_from_parallel``      all-reduce            identity
``gather_from_parallel``      all-gather            split
``scatter_to_parallel``       split                 all-gather
``gather_from_sequence``      all-gather            reduce-scatter
``reduce_scatter_to_sequence`` reduce-scatter       all-gather
============================  ====================  ====================

``split_sequence`` / ``gather_sequence`` are ``scatter_to_parallel`` / ``gather_from_parallel``
along the sequence dimension with the even-split check that sequence parallelism needs: they shard a
full batch for a sequence-parallel block and put its output back together.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .sharding import ShardSpec, piece_bounds, shard_sizes

__all__ = [
    "all_gather_along",
    "all_gather_shard",
    "copy_to_parallel",
    "copy_all_to_parallel",
    "reduce_from_parallel",
    "gather_from_parallel",
    "scatter_to_parallel",
    "gather_from_sequence",
    "gather_sequence_blocks",
    "reduce_scatter_sequence_blocks",
    "reduce_scatter_to_sequence",
    "split_sequence",
    "gather_sequence",
]


# torch 2.13 renamed the tensor-in / tensor-out collectives; older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def _all_reduce(x: Tensor, group: ProcessGroup, inplace: bool = False) -> Tensor:
    x = x.contiguous() if inplace else x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def all_gather_along(x: Tensor, group: ProcessGroup | None, dim: int, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (no autograd).

    ``sizes[r]`` is rank r's extent along ``dim``; ``None`` means all equal. Uneven extents are
    padded to the largest for the one all-gather (gloo and NCCL both need equal buffers) and trimmed.
    """
    world = _size(group)
    if world == 1:
        return x
    local = x.movedim(dim, 0)
    width = local.shape[0] if sizes is None else max(sizes)
    if local.shape[0] < width:
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        local = padded
    out = local.new_empty((world * width, *local.shape[1:]))
    _all_gather_single(out, local.contiguous(), group=group)
    if sizes is not None and any(s != width for s in sizes):
        out = torch.cat([out[r * width : r * width + s] for r, s in enumerate(sizes)])
    return out.movedim(0, dim)


def all_gather_shard(x: Tensor, spec: ShardSpec, group: ProcessGroup | None) -> Tensor:
    """The full tensor (``spec.shape``) from every rank's piece ``x`` (``spec.local_shape``), no autograd.

    One all-gather along ``spec.dim``, blocks put in their places; a replicated tensor is returned as is.
    Collective: every rank of ``group`` calls it with its own piece.
    """
    if not spec.is_sharded:
        return x
    return spec.assemble(all_gather_along(x, group, spec.dim, spec.rank_sizes))


def _split(x: Tensor, group: ProcessGroup, dim: int, sizes: Sequence[int]) -> Tensor:
    start, end = piece_bounds(sizes, group.rank())
    return x.narrow(dim, start, end - start).contiguous()


def gather_sequence_blocks(x: Tensor, group: ProcessGroup | None, dim: int) -> Tensor:
    """Every rank's equal block ``x`` concatenated along ``dim`` (no autograd), contiguous.

    The all-gather writes the blocks one after the other (``[W * x.shape[0], ...]``, as ``x`` is:
    no copy of the input); laying them out along ``dim`` is then one copy, or none where the dims
    before ``dim`` are all 1 (``[1, s/W, h] -> [1, s, h]``, or ``dim=0``).
    """
    world, dim = _size(group), dim % x.dim()
    if world == 1:
        return x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    blocks = out.view(world, *x.shape).movedim(0, dim)  # [..., W, s/W, ...]
    return blocks.reshape(*x.shape[:dim], world * x.shape[dim], *x.shape[dim + 1 :])


def reduce_scatter_sequence_blocks(
    x: Tensor, group: ProcessGroup, dim: int, *, dtype: torch.dtype | None = None, async_op: bool = False
) -> Tensor | tuple[Tensor, Any]:
    """This rank's block along ``dim`` of ``x`` summed over ``group`` in ``dtype`` (default ``x``'s),
    no autograd: contiguous ``[..., s/W, ...]``; with ``async_op`` ``(result-to-be, work)``, the result
    complete once ``work.wait()`` has returned.

    The blocks are read rank after rank: ``x`` as it is where the dims before ``dim`` are all 1 (or
    ``dim=0``), else one copy that puts each rank's block in one piece. Two ways to sum them
    (:func:`_sums_by_all_to_all` picks): the backend's reduce-scatter of ``x`` cast to ``dtype``, or
    (gloo) an all-to-all of ``x`` as it is (each rank receives every rank's copy of its own block)
    and the sum of those blocks in ``dtype``, rank 0 first (:class:`_SumOfBlocks`). The work returned
    with ``async_op`` supports ``wait()``.
    """
    world, dim = group.size(), dim % x.dim()
    dtype = x.dtype if dtype is None else dtype
    if dtype.itemsize <= x.dtype.itemsize:
        x = x.to(dtype)  # not wider: cast first (no copy for the same dtype), so only a widening sum mixes dtypes
    n = x.shape[dim] // world
    by_rank = x.reshape(*x.shape[:dim], world, n, *x.shape[dim + 1 :]).movedim(dim, 0).contiguous()
    out = x.new_empty((*x.shape[:dim], n, *x.shape[dim + 1 :]), dtype=dtype)
    if _sums_by_all_to_all(x, group, dtype):
        pending = _SumOfBlocks(by_rank, group, out)
        if async_op:
            return out, pending
        pending.wait()
        return out
    flat = by_rank.to(dtype).view(world * out.shape[0], *out.shape[1:])
    work = _reduce_scatter_single(out, flat, group=group, async_op=async_op)
    return (out, work) if async_op else out


def _sums_by_all_to_all(x: Tensor, group: ProcessGroup, dtype: torch.dtype) -> bool:
    """Whether :func:`reduce_scatter_sequence_blocks` sends ``x``'s blocks by all-to-all and sums them
    on arrival: for CPU tensors on gloo, whose reduce-scatter costs about an all-reduce of the whole
    tensor (two ranks, 4 MiB of bf16 on the 2-core CPU machine: 5.2 ms against 2.7 ms for all-to-all
    and sum; where ``dtype`` is wider than ``x``, bf16 partial gradients summed in fp32, the wire
    carries the narrow bytes: 11.9 ms against 3.9; ``benchmarks/bench_parts.py``, docs/design.md).
    Other backends (NCCL) keep their own reduce-scatter, of ``x`` cast to ``dtype``: not measured on a
    GPU here. Not under ``torch.compile``, which traces the reduce-scatter as its functional op."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    try:  # the backend that carries CPU tensors (a group made without naming one says "undefined")
        return isinstance(group._get_backend(x.device), dist.ProcessGroupGloo)
    except (AttributeError, RuntimeError):
        return "gloo" in str(dist.get_backend(group))


class _SumOfBlocks:
    """An all-to-all of ``by_rank [W, ...]`` (block j for rank j) that receives every other rank's
    block for this rank, then, at :meth:`wait`, their sum with this rank's own block into ``out``, in
    rank order (rank 0's block first) and in ``out``'s dtype. This rank's own block is not sent; the
    others arrive in a buffer of ``W-1`` blocks, or, with two ranks and no widening, in ``out`` itself
    (then ``theirs + own``: the same bits as ``own + theirs``), so the reduce-scatter needs no more
    memory than its result."""

    def __init__(self, by_rank: Tensor, group: ProcessGroup, out: Tensor) -> None:
        world, me = group.size(), group.rank()
        # What goes out: every block but this rank's own (a copy only for a rank in the middle).
        if me in (0, world - 1):
            send = by_rank[1:] if me == 0 else by_rank[:-1]
        else:
            send = torch.cat((by_rank[:me], by_rank[me + 1 :]))
        self._into_out = world == 2 and out.dtype == by_rank.dtype
        received = out.unsqueeze(0) if self._into_out else by_rank.new_empty((world - 1, *by_rank.shape[1:]))
        splits = [0 if r == me else 1 for r in range(world)]
        self._work = dist.all_to_all_single(received, send, splits, splits, group=group, async_op=True)
        self._received, self._own, self._me, self._out = received, by_rank[me], me, out

    def wait(self) -> bool:
        if self._work is None:
            return True
        self._work.wait()
        if self._into_out:
            self._out.add_(self._own)
        else:
            theirs = self._received.unbind(0)
            blocks = [*theirs[: self._me], self._own, *theirs[self._me :]]
            self._out.copy_(blocks[0])
            for block in blocks[1:]:
                self._out.add_(block)  # in out's dtype: a narrower block is widened, the sum not narrowed
        self._work = self._received = self._own = None
        return True


class _IdentityAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _IdentityAllReduceMany(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, group: ProcessGroup, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        return xs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        out = list(grads)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault((g.dtype, g.device), []).append(i)
        for idx in by_dtype.values():
            # One buffer of our own per dtype: the gradients' bytes side by side, reduced at once.
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=ctx.group)
            for i, piece in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = piece.view(grads[i].shape)
        return (None, *out)


class _AllReduceIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, inplace: bool) -> Tensor:
        return _all_reduce(x, group, inplace)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class _AllGatherSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int, sizes: Sequence[int] | None) -> Tensor:
        if sizes is None:
            sizes = [x.shape[dim]] * group.size()
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return all_gather_along(x, group, dim, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _split(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _SplitAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int, sizes: Sequence[int] | None) -> Tensor:
        if sizes is None:
            sizes = shard_sizes(x.shape[dim], group.size())
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _split(x, group, dim, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return all_gather_along(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _AllGatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int, dtype: torch.dtype | None) -> Tensor:
        ctx.group, ctx.dim, ctx.input_dtype = group, dim, x.dtype
        # Cast, then gather: the same values as casting the gathered tensor, in fewer bytes when narrower.
        return gather_sequence_blocks(x if dtype is None else x.to(dtype), group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # Summed in the input's dtype, as autograd would after the cast's own backward (the narrow
        # gradient on the wire: reduce_scatter_sequence_blocks).
        return reduce_scatter_sequence_blocks(grad, ctx.group, ctx.dim, dtype=ctx.input_dtype), None, None, None


class _ReduceScatterAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_sequence_blocks(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return gather_sequence_blocks(grad, ctx.group, ctx.dim), None, None


def copy_to_parallel(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Enter a tensor-parallel region. Forward: identity; backward: all-reduce (Megatron's ``f``)."""
    return x if _size(group) == 1 else _IdentityAllReduce.apply(x, group)


def copy_all_to_parallel(xs: Sequence[Tensor], group: ProcessGroup | None) -> list[Tensor]:
    """Enter a tensor-parallel region with several tensors at once. Forward: identity; backward: the
    gradients of all of them summed over the group by one all-reduce per dtype (their bytes side by side).

    What ``copy_to_parallel`` does for each, with one collective instead of ``len(xs)``. Tensors that do
    not require a gradient (or with gradients off) pass through untouched and are not reduced.
    """
    out = list(xs)
    if _size(group) == 1 or not torch.is_grad_enabled():
        return out
    idx = [i for i, x in enumerate(xs) if x.requires_grad]
    if idx:
        for i, y in zip(idx, _IdentityAllReduceMany.apply(group, *(xs[i] for i in idx))):
            out[i] = y
    return out


def reduce_from_parallel(x: Tensor, group: ProcessGroup | None, *, inplace: bool = False) -> Tensor:
    """Leave a tensor-parallel region. Forward: all-reduce; backward: identity (Megatron's ``g``).

    ``inplace=True`` reduces into ``x`` itself (saving a copy): only for a tensor nothing else holds,
    such as the output of the GEMM just before.
    """
    return x if _size(group) == 1 else _AllReduceIdentity.apply(x, group, inplace)


def _check_sizes(x: Tensor, group: ProcessGroup, dim: int, sizes: Sequence[int], local: bool) -> None:
    """``sizes`` must have one entry per rank and match ``x`` (its local block, or the whole)."""
    got = x.shape[dim]
    if len(sizes) != group.size() or (sizes[group.rank()] if local else sum(sizes)) != got:
        what = f"this rank's block (rank {group.rank()})" if local else "the sum"
        raise ValueError(
            f"sizes: expected {group.size()} entries whose {what} equals x.shape[{dim}] = {got}, got {list(sizes)}"
        )


def gather_from_parallel(
    x: Tensor, group: ProcessGroup | None, dim: int = -1, sizes: Sequence[int] | None = None
) -> Tensor:
    """Forward: all-gather along ``dim`` (uneven ``sizes`` allowed); backward: keep this rank's slice."""
    if _size(group) == 1:
        return x
    if sizes is not None:
        _check_sizes(x, group, dim, sizes, local=True)
    return _AllGatherSplit.apply(x, group, dim, sizes)


def scatter_to_parallel(
    x: Tensor, group: ProcessGroup | None, dim: int = -1, sizes: Sequence[int] | None = None
) -> Tensor:
    """Forward: keep this rank's slice along ``dim`` (``torch.tensor_split`` sizes unless ``sizes``);
    backward: all-gather."""
    if _size(group) == 1:
        return x
    if sizes is not None:
        _check_sizes(x, group, dim, sizes, local=False)
    return _SplitAllGather.apply(x, group, dim, sizes)


def gather_from_sequence(
    x: Tensor, group: ProcessGroup | None, dim: int = 1, *, dtype: torch.dtype | None = None
) -> Tensor:
    """Enter a tensor-parallel region from sequence-parallel shards.

    Forward: all-gather along the sequence ``dim``; backward: reduce-scatter along it.
    ``x [b, s/W, h] -> [b, s, h]`` for ``dim=1``, contiguous.

    ``dtype``: the result cast to it (e.g. autocast's bf16, where the GEMMs that follow would cast
    anyway): the cast runs before the all-gather, which then carries ``dtype``'s bytes; the values
    are those of ``gather_from_sequence(x).to(dtype)``, and backward still reduce-scatters the
    gradient in ``x``'s dtype, as autograd would after the cast.
    """
    if _size(group) == 1:
        return x if dtype is None else x.to(dtype)
    return _AllGatherReduceScatter.apply(x, group, dim, dtype)


def reduce_scatter_to_sequence(x: Tensor, group: ProcessGroup | None, dim: int = 1) -> Tensor:
    """Leave a tensor-parallel region into sequence-parallel shards.

    Forward: reduce-scatter along the sequence ``dim``; backward: all-gather along it.
    ``x [b, s, h] (partial sums) -> [b, s/W, h]`` for ``dim=1``.
    """
    world = _size(group)
    if world == 1:
        return x
    _check_divisible(x, world, dim, "x")
    return _ReduceScatterAllGather.apply(x, group, dim)


def _check_divisible(x: Tensor, world: int, dim: int, name: str) -> None:
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}: expected a tensor with a sequence dimension {dim}, got shape {tuple(x.shape)}")
    if x.shape[dim] % world:
        raise ValueError(
            f"{name}: sequence parallelism needs the sequence length (dim {dim}) to be divisible by the "
            f"tensor-parallel size {world}, got length {x.shape[dim]} (shape {tuple(x.shape)})"
        )


def split_sequence(x: Tensor, group: ProcessGroup | None, dim: int = 1) -> Tensor:
    """This rank's equal block of the full sequence ``x`` along ``dim``, for a sequence-parallel block.

    Forward: split; backward: all-gather. Raises ``ValueError`` when the length is not divisible by
    the group size.
    """
    world = _size(group)
    if world == 1:
        return x
    _check_divisible(x, world, dim, "x")
    return _SplitAllGather.apply(x, group, dim, None)


def gather_sequence(x: Tensor, group: ProcessGroup | None, dim: int = 1) -> Tensor:
    """Reassemble the full sequence from every rank's block. Forward: all-gather; backward: split."""
    return x if _size(group) == 1 else _AllGatherSplit.apply(x, group, dim, None)
