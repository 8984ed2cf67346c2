"""Single-process emulation of Hugging Face's ``pretraining_tp`` slicing of ``LlamaMLP``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ffn import FeedForward
from .layers import check_input
from .sharding import shard_bounds

__all__ = ["emulate_pretraining_tp"]


def emulate_pretraining_tp(ffn: FeedForward, x: Tensor, pretraining_tp: int) -> Tensor:
    """``ffn(x)`` computed slice by slice as ``LlamaMLP`` does with ``config.pretraining_tp = k``.

    gate/up weights are split by rows and down by columns into ``k`` contiguous slices, with the
    sizes ``torch.tensor_split`` gives (so slice i is exactly rank i's shard of a k-rank
    :class:`~tp_ffn.ParallelFeedForward`); per-slice ``F.linear``, concatenation, ``act(gate) * up``,
    split, per-slice down projection, sum. Unlike HF's code it keeps the biases (w2's once, after the
    sum), keeps the remainder rows when ``k`` does not divide the hidden size, and takes any number
    of leading dimensions: ``x [*, dim] -> [*, dim]``. Differentiable; needs no process group.
    """
    if not isinstance(ffn, FeedForward):
        raise TypeError(f"ffn: expected a tp_ffn.FeedForward, got {type(ffn).__name__}")
    if isinstance(pretraining_tp, bool) or not isinstance(pretraining_tp, int):
        raise TypeError(f"pretraining_tp: expected an int, got {type(pretraining_tp).__name__} ({pretraining_tp!r})")
    if not 1 <= pretraining_tp <= ffn.hidden_dim:
        raise ValueError(f"pretraining_tp: expected an int in [1, hidden_dim={ffn.hidden_dim}], got {pretraining_tp}")
    check_input(x, ffn.w1.weight, ffn.dim, what="dim")
    bounds = [shard_bounds(ffn.hidden_dim, pretraining_tp, i) for i in range(pretraining_tp)]

    def per_slice(layer: torch.nn.Linear) -> Tensor:
        return torch.cat([
            F.linear(x, layer.weight[s:e], None if layer.bias is None else layer.bias[s:e]) for s, e in bounds
        ], dim=-1)  # fmt: skip

    h = ffn.act(per_slice(ffn.w1)) * per_slice(ffn.w3)
    out = sum(F.linear(h[..., s:e], ffn.w2.weight[:, s:e]) for s, e in bounds)
    return out if ffn.w2.bias is None else out + ffn.w2.bias.to(out.dtype)
