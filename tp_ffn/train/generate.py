"""Text from a training checkpoint: load it TP-sharded at any TP size and sample bytes."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from ..groups import GroupLike, resolve_group
from ..models.llama import LlamaConfig, Transformer
from . import checkpoint as ckpt
from .config import UsageError
from .consensus import agree

__all__ = ["check_sampling", "generate", "load_checkpoint_model"]


def load_checkpoint_model(
    path: str | os.PathLike, *, group: GroupLike = None, device: torch.device | str | None = None
) -> tuple[Transformer, ckpt.CheckpointInfo]:
    """The model of a checkpoint, this rank's TP shard of it.

    ``path`` is a ``--ckpt-dir`` (its newest complete checkpoint is used) or one ``step_N``
    directory. ``group`` is the TP group (``None``: the default group, or a world of one). Reads
    only the model's tensors, whatever TP / dp layout wrote them. Collective over ``group`` (and only
    over it) when it has several ranks: the ranks agree on the checkpoint they found before reading
    it, and a disagreement is one :class:`UsageError` on every rank.
    """
    tp = resolve_group(group)

    def find() -> tuple[ckpt.CheckpointInfo, LlamaConfig]:
        info = ckpt.open_checkpoint(path)
        try:
            cfg = LlamaConfig(**info.meta["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"checkpoint {info.path}: cannot read its model config ({e})") from None
        try:
            cfg.check_tp(tp.size)
        except ValueError:
            fits = [str(n) for n in cfg.tp_sizes()]
            raise UsageError(
                f"checkpoint {info.path}: the model's n_heads ({cfg.n_heads}) and n_kv_heads ({cfg.kv_heads}) must "
                f"both be divisible by the tensor-parallel size ({tp.size}); run it on "
                f"{', '.join(fits[:-1]) + ' or ' if len(fits) > 1 else ''}{fits[-1]} rank{'s' if fits != ['1'] else ''}"
            ) from None
        return info, cfg

    info, cfg = agree(
        find, what=f"checkpoint {path}", describe=lambda found: ckpt.describe(found[0]),
        where=f"in {os.path.abspath(path)}", group=tp.group,
    )  # fmt: skip
    torch.manual_seed(0)  # the values are overwritten; the seed only keeps ranks' builds identical
    model = Transformer(cfg, group=group, device=device)
    ckpt.TrainingState(model, group=tp.group).load(info, model_only=True)
    return model.eval(), info


def check_sampling(prompt: list[int], temperature: float, top_k: int | None) -> None:
    """Raise :class:`UsageError` unless :func:`generate` can use these settings."""
    if not prompt:
        raise UsageError("--prompt: expected at least one byte")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature: expected a number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise UsageError(f"--top-k: expected an int >= 0 (0: all), got {top_k!r}")


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue ``prompt`` (token ids) by ``max_new_tokens`` sampled tokens; ``temperature=0`` is greedy.

    Every TP rank computes the same full logits; the token TP rank 0 draws is broadcast so that
    the ranks cannot drift apart even if their floating-point results differed in the last bit.
    ``top_k`` None or 0: every token.
    """
    check_sampling(prompt, temperature, top_k)
    tp = resolve_group(model.tp.group)
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([prompt], dtype=torch.int64, device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.cfg.max_seq_len :])[:, -1, :].float()
        nxt = _pick(logits, temperature, top_k, generator)
        if tp.size > 1:
            dist.broadcast(nxt, src=dist.get_global_rank(tp.group, 0), group=tp.group)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[0, len(prompt) :].tolist()


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
