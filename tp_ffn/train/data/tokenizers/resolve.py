"""Which tokenizer a command means: ``--tokenizer`` (``auto``, ``bytes`` or a path), a pretrained
directory's own, or the copy a training checkpoint carries.

``resolve_tokenizer("auto" | "bytes" | PATH, init_from=...)`` picks one for the training job;
``tokenizer_from_checkpoint`` reads the copy a training checkpoint carries (its files sit in the
step directory, listed in ``meta.json``, and its fingerprint is checked). Which format a set of
files is, each format says itself (:meth:`~.base.Tokenizer.detect`), tried in :data:`FORMATS` order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ...errors import UsageError
from .base import HF_SPECIAL_TOKENS, HF_TOKENIZER, HF_TOKENIZER_CONFIG, MODEL_FILE, Tokenizer
from .byte_level import ByteTokenizer
from .hf_json import HFTokenizer
from .llama2_sentencepiece import SentencePieceTokenizer
from .llama3_tiktoken import TiktokenTokenizer

__all__ = [
    "FORMATS",
    "TOKENIZER_KINDS",
    "find_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer",
    "tokenizer_from_checkpoint",
]

# Detection order: a tokenizer.json wins over a tokenizer.model beside it; no file is bytes.
FORMATS: tuple[type[Tokenizer], ...] = (HFTokenizer, TiktokenTokenizer, SentencePieceTokenizer, ByteTokenizer)
TOKENIZER_KINDS = tuple(f.kind for f in FORMATS)  # what a checkpoint's meta.json may record


def find_tokenizer(directory: Path) -> dict[str, Path] | None:
    """The tokenizer files of a checkpoint directory: ``tokenizer.json`` (with its configs) first,
    else ``tokenizer.model``; for a Meta directory also ``../tokenizer.model`` (the layout of
    Meta's Llama 2 downloads). ``None`` when there is none."""
    if (directory / HF_TOKENIZER).is_file():
        found = {HF_TOKENIZER: directory / HF_TOKENIZER}
        for extra in (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS):
            if (directory / extra).is_file():
                found[extra] = directory / extra
        return found
    if (directory / MODEL_FILE).is_file():
        return {MODEL_FILE: directory / MODEL_FILE}
    if (directory / "params.json").is_file() and (directory.parent / MODEL_FILE).is_file():
        return {MODEL_FILE: directory.parent / MODEL_FILE}
    return None


def load_tokenizer(files: Mapping[str, Path], *, what: str) -> Tokenizer:
    """The tokenizer made of ``files`` (roles as :func:`find_tokenizer` returns them).

    ``what`` names the source in errors (e.g. ``"--tokenizer runs/tok"``). Raises
    :class:`UsageError` for a missing library or a file that is not a tokenizer.
    """
    try:
        for fmt in FORMATS:
            if fmt.detect(files):
                return fmt.load(files)
        raise ValueError(f"expected {HF_TOKENIZER} or {MODEL_FILE}, got {sorted(files)}")
    except ImportError as e:
        raise UsageError(
            f"{what}: reading this tokenizer needs the Python package {e.name!r}: pip install 'tp-ffn[train]'"
        ) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{what}: {e}") from None


def _from_path(path: Path, what: str) -> Tokenizer:
    if path.is_dir():
        if (path / "meta.json").is_file() or any(p.name.startswith("step_") for p in path.iterdir()):
            return tokenizer_from_checkpoint(path)
        files = find_tokenizer(path)
        if files is None:
            raise UsageError(
                f"{what}: no tokenizer in {path} (expected {HF_TOKENIZER} or {MODEL_FILE}); "
                f"pass --tokenizer PATH, or --tokenizer bytes to train on byte ids"
            )
        return load_tokenizer(files, what=what)
    if not path.is_file():
        raise UsageError(f"{what}: no such file or directory: {path}")
    if path.suffix == ".json":
        files = {HF_TOKENIZER: path}
        for extra in (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS):
            if (path.parent / extra).is_file():
                files[extra] = path.parent / extra
        return load_tokenizer(files, what=what)
    return load_tokenizer({MODEL_FILE: path}, what=what)


def resolve_tokenizer(spec: str, *, init_from: str | os.PathLike | None = None) -> Tokenizer:
    """``--tokenizer``: ``"bytes"``; ``"auto"`` (the tokenizer of ``init_from``, else bytes); or a
    path: a ``tokenizer.json``, a ``tokenizer.model`` (tiktoken or SentencePiece, told apart by
    content), a directory holding one, or a training checkpoint (its copy)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "auto":
        if init_from is None:
            return ByteTokenizer()
        root = Path(init_from)
        files = find_tokenizer(root) if root.is_dir() else None
        if files is None:
            raise UsageError(
                f"--tokenizer auto: --init-from {init_from} holds no tokenizer ({HF_TOKENIZER} or {MODEL_FILE}); "
                f"pass --tokenizer PATH, or --tokenizer bytes to train the pretrained model on byte ids"
            )
        return load_tokenizer(files, what=f"--init-from {init_from}")
    return _from_path(Path(spec), f"--tokenizer {spec}")


def tokenizer_from_checkpoint(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a training checkpoint was trained with (``path``: a ``--ckpt-dir`` or a
    ``step_N`` directory). Checkpoints from before tokenizers were recorded are byte-level."""
    from ...checkpoint.store import open_checkpoint

    info = open_checkpoint(path)
    rec = info.meta.get("tokenizer")
    if rec is None:
        return ByteTokenizer()
    if not isinstance(rec, dict) or rec.get("kind") not in TOKENIZER_KINDS or not isinstance(rec.get("files"), list):
        raise UsageError(f"checkpoint {info.path} is damaged: meta.json has no readable tokenizer record ({rec!r})")
    if rec["kind"] == ByteTokenizer.kind:
        tok: Tokenizer = ByteTokenizer()
    else:
        files = {}
        for name in rec["files"]:
            if name not in (HF_TOKENIZER, HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS, MODEL_FILE):
                raise UsageError(f"checkpoint {info.path} is damaged: meta.json lists tokenizer file {name!r}")
            if not (info.path / name).is_file():
                raise UsageError(f"checkpoint {info.path} is damaged: its tokenizer file {name} is missing")
            files[name] = info.path / name
        tok = load_tokenizer(files, what=f"checkpoint {info.path}")
    if tok.kind != rec["kind"] or tok.fingerprint != rec.get("fingerprint"):
        raise UsageError(
            f"checkpoint {info.path} is damaged: its tokenizer files give {tok.kind} fingerprint {tok.fingerprint}, "
            f"meta.json says {rec['kind']} {rec.get('fingerprint')}"
        )
    return tok
