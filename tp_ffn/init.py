"""Initialisation of weight shards that does not depend on the tensor-parallel size.

``nn.Linear(in, out)`` draws its weight with ``kaiming_uniform_(a=sqrt(5))`` (uniform in
±1/sqrt(in)) and then its bias (uniform in ±1/sqrt(in)) from the default CPU generator, one draw
per element in row-major order. That stream can be cut anywhere: drawing rows ``[start, end)``
after skipping the ``start * in`` draws before them gives exactly those rows of the full matrix.
Each rank therefore draws only its own block (plus a bounded scratch buffer to skip the others'),
and every rank advances the generator by the whole layer, so random numbers drawn afterwards agree
across ranks whatever the shard sizes.

Every draw happens on the CPU (whatever the default device), from the default CPU generator; on
other devices the shard is drawn on the CPU and copied, so the full weights are the
same on every device and every tensor-parallel size. On the ``meta`` device nothing is drawn,
exactly as ``nn.Linear`` on ``meta`` draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["init_linear_shard_"]

# Elements per scratch draw; bounds the extra memory to a few MiB whatever the layer size.
_CHUNK = 1 << 20


def _skip(count: int, dtype: torch.dtype) -> None:
    """Advance the default CPU generator by ``count`` draws of ``dtype`` elements."""
    if count <= 0:
        return
    scratch = torch.empty(min(count, _CHUNK), dtype=dtype, device="cpu")
    while count > 0:
        n = min(count, scratch.numel())
        scratch[:n].uniform_()
        count -= n


def _draw_rows_(dest: Tensor, in_features: int, cols: Sequence[tuple[int, int]]) -> None:
    """Fill ``dest [rows, n]`` with the next ``rows`` full rows of a Linear weight whose fan-in is
    ``in_features``, keeping the column ranges ``cols`` (``[start, end)`` each, concatenated: ``n`` columns)."""
    rows_per_chunk = max(1, _CHUNK // in_features)
    full_width = list(cols) == [(0, in_features)]
    for r in range(0, dest.shape[0], rows_per_chunk):
        block = dest[r : r + rows_per_chunk]
        if full_width and block.device.type == "cpu":
            # Row blocks of a contiguous CPU shard are contiguous: draw into them directly.
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            continue
        rows = torch.empty(block.shape[0], in_features, dtype=dest.dtype, device="cpu")
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        kept = [rows[:, a:b] for a, b in cols]
        block.copy_(kept[0] if len(kept) == 1 else torch.cat(kept, 1))


def _draw_blocks_(
    dest: Tensor, total: int, row_len: int, blocks: Sequence[tuple[int, int]], draw: Callable[[Tensor], None]
) -> None:
    """Draw the ``blocks`` (ascending ``[start, end)`` ranges of ``total`` rows of ``row_len`` elements)
    into ``dest``'s rows one after the other with ``draw``, skipping the generator over the rows
    between them and after the last."""
    done = at = 0
    for start, end in blocks:
        _skip((start - done) * row_len, dest.dtype)
        draw(dest[at : at + end - start])
        at, done = at + end - start, end
    _skip((total - done) * row_len, dest.dtype)


@torch.no_grad()
def init_linear_shard_(
    weight: Tensor,
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    *,
    dim: int,
    blocks: Sequence[tuple[int, int]],
) -> None:
    """Fill a shard with what ``nn.Linear(in_features, out_features)`` would draw now.

    ``blocks`` are the ascending ``[start, end)`` ranges along ``dim`` that the shard holds, one
    after the other (one block for a plain column / row split; see :class:`~tp_ffn.sharding.ShardSpec`).
    ``dim=0``: ``weight [n, in]`` holds those rows, ``bias [n]`` likewise (column-parallel).
    ``dim=1``: ``weight [out, n]`` holds those columns and ``bias [out]`` is whole (row-parallel).
    The default CPU generator advances by ``out*in + out`` draws (``out*in`` without bias), as for
    the dense layer.
    """
    if weight.device.type == "meta":
        return
    dtype = weight.dtype
    if dim == 0:
        whole_rows = [(0, in_features)]
        _draw_blocks_(
            weight, out_features, in_features, blocks, lambda rows: _draw_rows_(rows, in_features, whole_rows)
        )
    elif dim == 1:
        _draw_rows_(weight, in_features, blocks)
    else:
        raise ValueError(f"dim: expected 0 (rows) or 1 (columns), got {dim}")
    if bias is None:
        return
    bound = 1 / math.sqrt(in_features)

    def draw_bias(dest: Tensor) -> None:
        dest.copy_(torch.empty(dest.shape[0], dtype=dtype, device="cpu").uniform_(-bound, bound))

    _draw_blocks_(bias, out_features, 1, blocks if dim == 0 else [(0, out_features)], draw_bias)
