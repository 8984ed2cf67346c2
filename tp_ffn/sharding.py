"""How a tensor is sharded over a tensor-parallel group: the one place that says which slice a rank holds.

Every parallel layer publishes a :class:`ShardSpec` for each of its parameters
(``layer.shard_spec("weight")``); every loader, exporter and checkpoint layout reads it
(:func:`shard_spec_of`, :func:`named_shard_specs`) instead of working the slice out again. A layer
of one's own joins by the same two members: ``shard_spec(name) -> ShardSpec`` for each parameter
it holds directly, and ``tp`` (its :class:`~tp_ffn.groups.TPGroup`, for the gathers); a module
without ``shard_spec`` holds replicated tensors.

The spec is asked of the layer, not stored on the parameter (Megatron's ``partition_dim``): loaders
replace meta-device parameters, ``to_empty`` and FSDP2 swap them for new tensors, and an attribute
on the old one would be lost; the layer's answer comes from its construction arguments and cannot.

A spec names the full shape, the split dimension and its *parts*: the split dimension is a
concatenation of consecutive parts, and each part is cut over the ``world`` ranks with
``torch.tensor_split`` sizes (the first ``size % world`` ranks hold one more). Rank r holds its
block of every part, in part order, one after the other in its local tensor::

    weight                   full shape     dim  parts       rank r of W holds (s, e = shard_bounds(I, W, r))
    column-parallel w1/w3    [I, H]         0    (I,)        rows [s, e)
    row-parallel w2          [H, I]         1    (I,)        columns [s, e)
    fused gate/up            [2I, H]        0    (I, I)      rows [s, e) then [I + s, I + e)   local [2 n_r, H]
    stacked experts gate/up  [E, 2I, H]     1    (I, I)      [:, s:e] then [:, I + s:I + e]     local [E, 2 n_r, H]
    stacked experts down     [E, H, I]      2    (I,)        [:, :, s:e]                        local [E, H, n_r]
    norms, embeddings        any            None ()          everything (replicated)

(fairscale's ``stride=k`` is ``k`` equal parts; gpt-fast's ``weight_splits`` are the parts of a fused qkv.)
The other layouts of the same weights follow from the layer's spec: :meth:`ShardSpec.select` drops an
unsplit dim (one expert, as a per-expert checkpoint stores it), :meth:`ShardSpec.cat` joins specs along the
split dim (w1 and w3 stored as one fused gate/up).

The sizes convention is tp_ffn's, ``torch.tensor_split``'s; FSDP2 and DTensor's ``Shard`` placement
cut with ``torch.chunk``'s (:func:`chunk_bounds`): 10 over 4 is 3, 3, 2, 2 here and 3, 3, 3, 1 there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

__all__ = [
    "ShardSpec",
    "chunk_bounds",
    "named_shard_specs",
    "piece_bounds",
    "shard_bounds",
    "shard_sizes",
    "shard_spec_of",
]

Box = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``n`` split over ``world_size`` ranks as ``torch.tensor_split`` does it.

    The first ``n % world_size`` ranks hold one more element: 11008 over 3 -> [3670, 3669, 3669].
    """
    base, extra = divmod(n, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous block of ``n`` (see :func:`shard_sizes`)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def piece_bounds(sizes: Sequence[int], index: int) -> tuple[int, int]:
    """``[start, end)`` of piece ``index`` of a dim cut into consecutive pieces of ``sizes`` (any sizes, e.g.
    a sequence split the caller chose; :func:`shard_bounds` is the case of :func:`shard_sizes`)."""
    start = sum(sizes[:index])
    return start, start + sizes[index]


def chunk_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of piece ``index`` of ``torch.chunk(range(n), parts)`` (empty past the end):
    FSDP2's and DTensor ``Shard``'s convention, not tp_ffn's."""
    size = -(-n // parts)
    start = min(index * size, n)
    return start, min(start + size, n)


def _check_int(name: str, value: object, at_least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise ValueError(f"ShardSpec.{name}: expected an int >= {at_least}, got {value!r}")
    return value


@dataclass(frozen=True)
class ShardSpec:
    """Rank ``rank`` of ``world``'s piece of a tensor of full shape ``shape`` (see the module docstring).

    ``dim=None``: replicated, every rank holds the whole tensor. Otherwise ``dim`` is split: its
    ``parts`` (default one part, the whole dim) are each cut over the ranks, and :attr:`blocks` are
    the ``(start, end)`` ranges along ``dim`` this rank holds, in the order its local tensor stores
    them. Validated at construction; build one with :meth:`replicated` or :meth:`split`.
    """

    shape: tuple[int, ...]
    dim: int | None = None
    parts: tuple[int, ...] = ()
    rank: int = 0
    world: int = 1
    blocks: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        for i, n in enumerate(shape):
            _check_int(f"shape[{i}]", n, 0)
        _check_int("world", self.world, 1)
        if _check_int("rank", self.rank, 0) >= self.world:
            raise ValueError(f"ShardSpec.rank: expected 0 <= rank < world={self.world}, got {self.rank}")
        object.__setattr__(self, "shape", shape)
        if self.dim is None:
            if self.parts:
                raise ValueError(f"ShardSpec.parts: expected () for a replicated tensor (dim=None), got {self.parts}")
            object.__setattr__(self, "blocks", ())
            return
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"ShardSpec.dim: expected None or a dim of shape {shape}, got {self.dim!r}")
        dim = self.dim % len(shape)
        parts = tuple(self.parts) if self.parts else (shape[dim],)
        for i, n in enumerate(parts):
            _check_int(f"parts[{i}]", n, 0)
        if sum(parts) != shape[dim]:
            raise ValueError(
                f"ShardSpec.parts: expected parts adding up to shape[{dim}]={shape[dim]}, "
                f"got {parts} (sum {sum(parts)})"
            )
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "parts", parts)
        blocks, offset = [], 0
        for n in parts:
            s, e = shard_bounds(n, self.world, self.rank)
            blocks.append((offset + s, offset + e))
            offset += n
        object.__setattr__(self, "blocks", tuple(blocks))

    @classmethod
    def replicated(cls, shape: Sequence[int]) -> ShardSpec:
        """Every rank holds the whole tensor."""
        return cls(tuple(shape))

    @classmethod
    def split(
        cls, shape: Sequence[int], dim: int, rank: int, world: int, parts: Sequence[int] | None = None
    ) -> ShardSpec:
        """``dim`` of ``shape`` cut over ``world`` ranks, part by part (``parts`` default: the whole dim)."""
        return cls(tuple(shape), dim, tuple(parts or ()), rank, world)

    def select(self, dim: int) -> ShardSpec:
        """The layout of ``full.select(dim, i)`` (any ``i``), e.g. one expert of a stacked expert weight:
        ``dim`` is dropped, the split stays. ``dim`` must not be the split dim."""
        if not -len(self.shape) <= dim < len(self.shape):
            raise ValueError(f"ShardSpec.select: expected a dim of shape {self.shape}, got {dim}")
        dim %= len(self.shape)
        if dim == self.dim:
            raise ValueError(f"ShardSpec.select: dim {dim} is the split dim; select another")
        shape = self.shape[:dim] + self.shape[dim + 1 :]
        if self.dim is None:
            return ShardSpec.replicated(shape)
        return ShardSpec(shape, self.dim - (dim < self.dim), self.parts, self.rank, self.world)

    @classmethod
    def cat(cls, specs: Sequence[ShardSpec]) -> ShardSpec:
        """The layout of ``torch.cat([full_0, full_1, ...], dim)`` of tensors split along the same ``dim``:
        their parts one after the other, e.g. a fused gate/up ``[E, 2I, H]`` from the w1 and w3 ``[E, I, H]``
        of the same experts. Every spec must be split along one dim, at the same rank of the same world,
        with the same shape elsewhere."""
        first = specs[0]

        def key(s: ShardSpec) -> tuple:  # what must agree: the world, the rank, the shape outside dim
            return s.rank, s.world, s.shape[: s.dim] + s.shape[s.dim + 1 :]  # type: ignore[operator]

        if first.dim is None or any(s.dim != first.dim or key(s) != key(first) for s in specs):
            raise ValueError(f"ShardSpec.cat: expected specs split along one dim, alike elsewhere, got {list(specs)}")
        shape = list(first.shape)
        shape[first.dim] = sum(s.shape[first.dim] for s in specs)
        return cls(tuple(shape), first.dim, tuple(n for s in specs for n in s.parts), first.rank, first.world)

    @property
    def is_sharded(self) -> bool:
        """False when every rank holds the whole tensor."""
        return self.dim is not None

    @property
    def local_size(self) -> int | None:
        """This rank's extent along ``dim`` (``None`` when replicated)."""
        return None if self.dim is None else sum(e - s for s, e in self.blocks)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of the tensor this rank holds."""
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = sum(e - s for s, e in self.blocks)
        return tuple(shape)

    @property
    def rank_sizes(self) -> list[int] | None:
        """Every rank's extent along ``dim``, in rank order (what an all-gather along ``dim`` needs)."""
        if self.dim is None:
            return None
        per_part = [shard_sizes(n, self.world) for n in self.parts]
        return [sum(sizes[r] for sizes in per_part) for r in range(self.world)]

    def for_rank(self, rank: int) -> ShardSpec:
        """The same layout seen from ``rank``."""
        return replace(self, rank=rank)

    def ranges(self) -> list[tuple[int, int, int]]:
        """``(start, end, local_start)`` for each block: ``full.narrow(dim, start, end - start)`` is
        ``local.narrow(dim, local_start, end - start)``. Empty when replicated (read the whole tensor)."""
        out, at = [], 0
        for s, e in self.blocks:
            out.append((s, e, at))
            at += e - s
        return out

    def _check_full(self, full: Tensor, name: str) -> None:
        if tuple(full.shape) != self.shape:
            raise ValueError(f"{name}: expected the full shape {self.shape}, got {tuple(full.shape)}")

    def take_blocks(self, full: Tensor, *, name: str = "full") -> list[Tensor]:
        """This rank's blocks of ``full`` (a tensor of :attr:`shape`), one view each, in :attr:`blocks` order
        (``[full]`` when replicated): where each goes when the blocks are kept apart, as a fused gate/up's
        go to w1 and w3."""
        self._check_full(full, name)
        if self.dim is None:
            return [full]
        return [full.narrow(self.dim, s, e - s) for s, e in self.blocks]

    def take(self, full: Tensor, *, copy: bool = False, name: str = "full") -> Tensor:
        """This rank's piece of ``full`` (a tensor of :attr:`shape`), shaped :attr:`local_shape`.

        One block (or replicated) is a view of ``full`` unless ``copy``; several blocks are
        concatenated into a new tensor. Differentiable.
        """
        pieces = self.take_blocks(full, name=name)
        if len(pieces) > 1:
            return torch.cat(pieces, self.dim)
        return pieces[0].clone(memory_format=torch.contiguous_format) if copy else pieces[0]

    def place(self, local: Tensor, full: Tensor) -> None:
        """Copy this rank's piece ``local`` (:attr:`local_shape`) into its place in ``full`` (:attr:`shape`)."""
        self._check_full(full, "full")
        if tuple(local.shape) != self.local_shape:
            raise ValueError(f"local: expected this rank's shape {self.local_shape}, got {tuple(local.shape)}")
        if self.dim is None:
            full.copy_(local)
            return
        for s, e, at in self.ranges():
            full.narrow(self.dim, s, e - s).copy_(local.narrow(self.dim, at, e - s))

    def assemble(self, gathered: Tensor, dim: int | None = None) -> Tensor:
        """The full tensor from every rank's local tensor concatenated in rank order along ``dim``
        (default :attr:`dim`; another one for an activation, e.g. ``-1`` for a column-parallel output).

        ``torch.cat([local_0, local_1, ...], dim)`` is the full tensor when there is one part; with
        several, each part's blocks are picked out of every rank's piece. Differentiable.
        """
        if self.dim is None:
            return gathered
        dim = self.dim if dim is None else dim
        if len(self.parts) == 1:
            return gathered
        pieces: list[list[Tensor]] = [[] for _ in self.parts]  # [part][rank]
        start = 0
        for r in range(self.world):
            for k, (s, e, at) in enumerate(self.for_rank(r).ranges()):
                pieces[k].append(gathered.narrow(dim, start + at, e - s))
            start += self.for_rank(r).local_size or 0
        return torch.cat([p for part in pieces for p in part], dim)

    def boxes(self, offsets: Sequence[int], sizes: Sequence[int]) -> list[Box]:
        """Where the box ``[offsets, offsets + sizes)`` of this rank's local tensor lies in the full one:
        ``(global offsets, sizes, local offsets)`` of each rectangle (several when it crosses blocks).

        This is how a second cut on top of the TP one is placed, e.g. FSDP2's ``torch.chunk`` of
        dim 0 of the local tensor (:func:`tp_ffn.train.checkpoint.layout.param_blocks`). A box holding nothing
        is returned as one empty rectangle.
        """
        offsets, sizes = tuple(offsets), tuple(sizes)
        if self.dim is None:
            return [(offsets, sizes, offsets)]
        d, lo, hi = self.dim, offsets[self.dim], offsets[self.dim] + sizes[self.dim]

        def rect(start: int, n: int, local_start: int) -> Box:
            return (
                (*offsets[:d], start, *offsets[d + 1 :]),
                (*sizes[:d], n, *sizes[d + 1 :]),
                (*offsets[:d], local_start, *offsets[d + 1 :]),
            )

        ranges, out = self.ranges(), []
        for s, e, at in ranges:
            a, b = max(lo, at), min(hi, at + e - s)  # the part of the box inside this block, local
            if b > a:
                out.append(rect(s + a - at, b - a, a))
        if not out:  # nothing along dim: an empty rectangle where the box starts (past the end: the last block's end)
            start = next((s + lo - at for s, e, at in ranges if lo < at + e - s), ranges[-1][1])
            out.append(rect(start, 0, lo))
        return out


def shard_spec_of(module: nn.Module, name: str, tensor: Tensor | None = None) -> ShardSpec:
    """The :class:`ShardSpec` of ``module``'s parameter ``name`` (a dotted path below ``module`` is
    resolved): what its owner's ``shard_spec(attr)`` says, or replicated (the tensor's own shape)
    when the owner publishes none, as an ``nn.Linear``, a norm or an embedding.
    """
    prefix, _, attr = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    publish = getattr(type(owner), "shard_spec", None)
    if callable(publish) and attr in owner._parameters:
        return owner.shard_spec(attr)
    if tensor is None:
        tensor = getattr(owner, attr)
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"{name}: expected a parameter or buffer of {type(module).__name__}, got {type(tensor).__name__}"
            )
    return ShardSpec.replicated(tensor.shape)


def named_shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """``{fully qualified name: ShardSpec}`` for every parameter of ``model``, in ``named_parameters`` order."""
    out: dict[str, ShardSpec] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            out[f"{mod_name}.{attr}" if mod_name else attr] = shard_spec_of(module, attr, p)
    return out
