"""The keys and values of earlier positions, kept for generation so each new token costs one position.

Each TP rank caches only its own key/value heads (``n_kv_heads / W`` of them), the ones its
column-parallel ``wk`` / ``wv`` shards produce, so the cache is sharded exactly like attention::

    per layer, per rank:  k, v [batch, n_kv_heads / W, max_len, head_dim]
    per rank in all:      2 * n_layers * batch * max_len * (n_kv_heads / W) * head_dim elements

With grouped-query attention (``n_kv_heads < n_heads``) the cache holds the kv heads once, not
repeated per query head. The buffers are allocated on the first write, in the dtype and on the
device of the keys written (so autocast and the model's dtype need no extra argument).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache", "LayerKV"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"KVCache.{name}: expected a positive int, got {value!r}")
    return value


class LayerKV:
    """One layer's cache: ``k, v [batch, kv_heads, max_len, head_dim]``, filled up to the last write."""

    def __init__(self, batch: int, max_len: int) -> None:
        self.batch, self.max_len = batch, max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [b, kv_heads, s, head_dim]`` at positions ``[start_pos, start_pos + s)``.

        Returns the keys and values of positions ``[0, start_pos + s)``, ``[b, kv_heads, start_pos + s, head_dim]``
        (views of the cache: positions before ``start_pos`` are whatever the earlier writes put there).
        """
        end = start_pos + k.shape[2]
        if self.k is None or self.v is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer of a :class:`~tp_ffn.models.Transformer`, this rank's heads.

    Made by ``model.new_cache(batch)`` (or ``KVCache(n_layers, batch, max_len)``) and passed to
    ``model(tokens, start_pos=p, cache=cache)``, which writes positions ``[p, p + s)`` of every
    layer and attends to positions ``[0, p + s)``: a prefill of the prompt at ``p = 0``, then one
    token per call. The cache does not count positions itself; the caller says where each call
    starts (as Meta's ``start_pos``). For inference (under ``torch.no_grad``): writes are in place.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int) -> None:
        _positive_int("n_layers", n_layers)
        self.batch = _positive_int("batch", batch)
        self.max_len = _positive_int("max_len", max_len)
        self.layers = [LayerKV(batch, max_len) for _ in range(n_layers)]

    def __len__(self) -> int:
        return len(self.layers)
