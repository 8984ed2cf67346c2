"""A training checkpoint written back as a Hugging Face or Meta directory, with its tokenizer.

    scripts/convert_checkpoint.py --from train --to hf   runs/ft  out/hf     config.json, model.safetensors, tokenizer files
    scripts/convert_checkpoint.py --from train --to meta --num-shards 2 runs/ft out/meta
                                                                            params.json, consolidated.XX.pth, tokenizer.model

The weights are read whole in one process with :func:`tp_ffn.train.checkpoint.store.load_full_tensors`
(whatever TP / dp layout wrote them), the tokenizer with
:func:`~tp_ffn.train.data.tokenizers.resolve.tokenizer_from_checkpoint`; writing is
:func:`tp_ffn.models.export.write_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...models.export import write_pretrained
from ...models.llama import LlamaConfig
from ...models.weights_types import Progress
from ..checkpoint.store import load_full_tensors, open_checkpoint, verify_checkpoint
from ..data.tokenizers.resolve import tokenizer_from_checkpoint
from ..errors import UsageError

__all__ = ["export_checkpoint"]


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    num_shards: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
    embedding_split: str | None = None,
    verify: bool = True,
) -> Path:
    """Write the training checkpoint ``src`` (a ``--ckpt-dir``: its newest; or a ``step_N``
    directory) to ``dst`` as ``to`` = ``"hf"`` or ``"meta"``; returns the step directory read.

    Hugging Face: ``transformers``' ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer``
    load it and give the training model's logits and token ids. Meta: ``consolidated.XX.pth`` in
    ``num_shards`` shards, ``params.json``, and the tokenizer's files (``tokenizer.model`` for
    Meta's formats); the embedding is split as ``embedding_split`` says (``None``: by vocabulary,
    as Llama 3's code and llama-models load it; ``"dim"`` for Llama 1/2's code; see
    :func:`~tp_ffn.models.export.export_meta`). ``verify=False`` skips the data files' digests
    (``--no-verify-checkpoint``), not the other checks. Weights keep the checkpoint's dtype (float32 master
    weights). Raises
    :class:`UsageError` for a damaged checkpoint, ``ValueError`` / ``FileExistsError`` as
    :func:`~tp_ffn.models.export.write_pretrained`.
    """
    info = open_checkpoint(src)
    verify_checkpoint(info, digests=verify)  # every file against its digest, before anything is read
    try:
        cfg = LlamaConfig(**info.meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {info.path}: cannot read its model config ({e})") from None
    tok = tokenizer_from_checkpoint(info.path)
    if to == "hf":
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
        write_pretrained(
            load_full_tensors(info.path, verify=False), cfg, dst, to="hf", overwrite=overwrite, progress=progress, hf_config=ids,
            extra=lambda d: tok.save(d, to="hf", model_max_length=cfg.max_seq_len),
        )  # fmt: skip
    else:
        split = embedding_split or "vocab"  # today's reference code (Llama 3, llama-models); "dim": Llama 1/2
        write_pretrained(
            load_full_tensors(info.path, verify=False), cfg, dst, to=to, num_shards=num_shards, overwrite=overwrite,
            progress=progress, extra=lambda d: tok.save(d, to="meta"), embedding_split=split,
        )  # fmt: skip
    return info.path
