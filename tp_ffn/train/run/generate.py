"""Sampling from a model: load a training checkpoint TP-sharded, then prefill the prompt and add one token per step.

Each step runs one new position against a key/value cache (:class:`~tp_ffn.models.kv_cache.KVCache`,
each TP rank caching its own kv heads) instead of the whole prefix; ``use_cache=False`` recomputes
the whole context every step, token for token the same (the test and ``benchmarks/bench_generate.py``
hold the two against each other).

Picking a token, in Hugging Face's order: ``temperature`` divides the logits (0: greedy, the
argmax; then ``top_k`` and ``top_p`` do nothing), ``top_k`` keeps the k likeliest tokens (0 or
None: all), ``top_p`` keeps the smallest set of likeliest tokens whose probability reaches p
(nucleus sampling; 1.0 or None: all), and one token is drawn from what is left with ``generator``.

The window: a model has positions ``[0, max_seq_len)``. A prompt longer than that keeps its last
``max_seq_len`` tokens. When the context fills the window, its oldest half is dropped and the
newest ``max_seq_len // 2`` tokens are run again from position 0 (one prefill; llama.cpp's context
shift also halves, nanoGPT crops to the window by recomputing every step). Generation therefore
goes on past ``max_seq_len``, each token beyond it seeing at least ``max_seq_len // 2`` tokens
before it; ``use_cache=False`` uses the same windows, so both give the same tokens.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ...groups import GroupLike, resolve_group
from ...models.llama import LlamaConfig, Transformer
from ..checkpoint import store as ckpt
from ..consensus import agree
from ..errors import UsageError

__all__ = ["check_sampling", "generate", "load_checkpoint_model", "sample_next_token"]


def load_checkpoint_model(
    path: str | os.PathLike,
    *,
    group: GroupLike = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> tuple[Transformer, ckpt.CheckpointInfo]:
    """The model of a checkpoint, this rank's TP shard of it.

    ``path`` is a ``--ckpt-dir`` (its newest complete checkpoint is used) or one ``step_N``
    directory. ``group`` is the TP group (``None``: the default group, or a world of one). Reads
    only the model's tensors, whatever TP / dp layout wrote them. Collective over ``group`` (and only
    over it) when it has several ranks: the ranks agree on the checkpoint they found before reading
    it, and a disagreement is one :class:`UsageError` on every rank. The checkpoint is then checked
    (:func:`~tp_ffn.train.checkpoint.store.verify_checkpoint`; ``verify=False`` skips the data files'
    digests) and read without running pickled code; a bad one raises :class:`UsageError` before the
    model is built.
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
    ckpt.verify_checkpoint(info, digests=verify, group=tp.group if tp.size > 1 else None)
    torch.manual_seed(0)  # the values are overwritten; the seed only keeps ranks' builds identical
    model = Transformer(cfg, group=group, device=device)
    ckpt.TrainingState(model, group=tp.group).load(info, model_only=True)
    return model.eval(), info


def check_sampling(*, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` naming the first argument out of range: temperature >= 0, top_k >= 0, 0 < top_p <= 1.

    ``top_k`` 0 or None and ``top_p`` 1 or None switch that filter off.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k: expected an int >= 0 (0 or None: no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1] (1 or None: no nucleus filter), got {top_p!r}")


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits [b, vocab]``: ``[b, 1]`` int64, on the device of ``logits``.

    Greedy at ``temperature == 0``; else the filters of the module docstring, then a draw on the
    CPU with ``generator`` (the same draws on every device and TP size).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the likelier ones already reach top_p; the likeliest always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


class _Context:
    """Logits of the next position for ``tokens[:, start:end]``, from the cache or recomputed."""

    def __init__(self, model: Transformer, batch: int, max_len: int, use_cache: bool) -> None:
        self.model = model
        self.cache = model.new_cache(batch, max_len) if use_cache else None
        self.start, self.filled = 0, 0  # the cache holds tokens[:, start : start + filled] at [0, filled)

    def next_logits(self, tokens: Tensor, start: int, end: int) -> Tensor:
        if self.cache is None:
            return self.model(tokens[:, start:end])[:, -1]
        if start != self.start:  # the window moved: every position changed, run it again
            self.start, self.filled = start, 0
        new = tokens[:, start + self.filled : end]
        logits = self.model(new, start_pos=self.filled, cache=self.cache)[:, -1]
        self.filled = end - start
        return logits


def _prompts(prompt: Sequence[int] | Sequence[Sequence[int]], vocab_size: int) -> tuple[list[list[int]], bool]:
    """``(batch of prompts, whether one prompt was given)``, checked."""
    items = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
    single = all(isinstance(t, int) for t in items)
    if not single and not all(isinstance(t, (list, tuple, Tensor)) for t in items):
        raise ValueError("prompt: expected a list of token ids, or a list of such lists (a batch)")
    batch = [items] if single else [t.tolist() if isinstance(t, Tensor) else list(t) for t in items]
    if not batch or any(not p for p in batch):
        raise ValueError("prompt: expected at least one token (in every prompt of a batch)")
    for p in batch:
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt: expected token ids in [0, {vocab_size}), got {bad[:5]}")
    return batch, single


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_tokens: Collection[int] = (),
) -> list[int] | list[list[int]]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens, picked as in the module docstring.

    ``prompt`` is one list of ids (the result is one list) or a batch of them, of any lengths (the
    result is a list per prompt; each continues its own prompt, as if generated alone). Generation
    of a sample ends at the first token in ``stop_tokens`` (e.g. the tokenizer's EOS), which is not
    returned. ``use_cache=False`` recomputes the context every step (same tokens, for checks and
    measurements). Every TP rank computes the same full logits; the token TP rank 0 picks is
    broadcast so that the ranks cannot drift apart even if their floating-point results differed in
    the last bit. A collective over the model's TP group. Not with ``sequence_parallel``.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if model.sequence_parallel:
        raise ValueError(
            "model: built with sequence_parallel=True, which splits the sequence over ranks; generation runs "
            "one position per step: build the model without it (the parameters are the same)"
        )
    batch, single = _prompts(prompt, model.cfg.vocab_size)
    if max_new_tokens == 0:
        return [] if single else [[] for _ in batch]
    stop = set(stop_tokens)
    tp = resolve_group(model.tp.group)
    device = model.tok_embeddings.weight.device
    window = model.cfg.max_seq_len
    # A prompt longer than the window keeps its last `window` tokens (only those could be seen):
    # then every context starts at 0 and moves with `cur` alone, the same in a batch as alone.
    batch = [p[-window:] for p in batch]
    lengths = [len(p) for p in batch]
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros(len(batch), total, dtype=torch.int64, device=device)
    forced = torch.zeros(len(batch), total, dtype=torch.bool, device=device)  # prompt positions
    for i, p in enumerate(batch):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        forced[i, : len(p)] = True
    ctx = _Context(model, len(batch), min(window, total), use_cache)
    done = [False] * len(batch)
    ends = [length + max_new_tokens for length in lengths]  # where each sample's output ends (exclusive)
    start = 0
    for cur in range(min(lengths), total):
        if cur - start > window:
            start = cur - max(1, window // 2)
        logits = ctx.next_logits(tokens, start, cur)
        nxt = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if tp.size > 1:
            dist.broadcast(nxt, src=dist.get_global_rank(tp.group, 0), group=tp.group)
        tokens[:, cur] = torch.where(forced[:, cur], tokens[:, cur], nxt[:, 0])
        if stop:
            for i, t in enumerate(tokens[:, cur].tolist()):
                if not done[i] and cur >= lengths[i] and t in stop:
                    done[i], ends[i] = True, cur
        if all(done[i] or cur + 1 >= ends[i] for i in range(len(batch))):
            break
    out = [tokens[i, lengths[i] : ends[i]].tolist() for i in range(len(batch))]
    return out[0] if single else out
