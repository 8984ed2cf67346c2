"""AdamW, the warmup + cosine schedule, and gradient clipping by the true global norm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..checkpoint.layout import Block, local_tensor, param_blocks

__all__ = [
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "clip_grad_norm_",
    "global_grad_norm",
    "init_adamw_state",
]


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the peak lr at step ``s`` (0-based): linear warmup, then cosine to ``min_ratio``.

    ``s < warmup``: ``(s + 1) / warmup``; then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2``
    with ``t = (s - warmup) / (total - warmup)`` going from 0 to 1 over the remaining steps.
    """

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) are decayed, vectors (norm weights, biases) are not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def init_adamw_state(opt: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state now (as its first step would), so a checkpoint can be
    loaded into it and a fresh and a resumed run take the same code path."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_scheduler(opt: torch.optim.Optimizer, schedule: WarmupCosine) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def global_grad_norm(
    model: nn.Module, *, tp_rank: int, group: ProcessGroup | None = None, blocks: dict[str, Block] | None = None
) -> Tensor:
    """The L2 norm of the whole model's gradient, as one process holding every weight would see it.

    Each rank sums the squares of the gradient elements it holds. TP-sharded parameters hold
    disjoint blocks on every rank and count everywhere; replicated ones (embeddings, norms) hold the
    same values on every rank of the TP group and count only on TP rank 0; FSDP2 splits both over
    the dp group into disjoint pieces. One all-reduce over ``group`` (the whole world, default)
    adds it up. Returns a float64 scalar, the same on every rank.
    """
    blocks = param_blocks(model) if blocks is None else blocks
    device = next(model.parameters()).device
    squares = [
        torch.linalg.vector_norm(local_tensor(p.grad).detach(), 2, dtype=torch.float64).square()
        for name, p in model.named_parameters()
        if p.grad is not None and (blocks[name].tp_sharded or tp_rank == 0)
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grad_norm_(
    model: nn.Module, max_norm: float, *, tp_rank: int, blocks: dict[str, Block] | None = None
) -> Tensor:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``; return the norm before clipping.

    ``max_norm <= 0`` only measures. The scale is computed from :func:`global_grad_norm`, so every
    rank applies the same factor.
    """
    norm = global_grad_norm(model, tp_rank=tp_rank, blocks=blocks)
    if max_norm <= 0:
        return norm
    with torch.no_grad():
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                g = local_tensor(p.grad)
                g.mul_(coef.to(g.dtype))
    return norm
