"""What every tokenizer format is: the :class:`Tokenizer` interface, and the names of the files.

A format is one subclass, which says which files are its own (:meth:`Tokenizer.detect`), reads them
(:meth:`Tokenizer.load`) and writes them as a Hugging Face or Meta checkpoint carries them
(:meth:`Tokenizer.save`)::

    byte_level.py            ByteTokenizer            bytes          no file
    hf_json.py               HFTokenizer              hf             tokenizer.json (+ its configs)
    llama3_tiktoken.py       TiktokenTokenizer        tiktoken       tokenizer.model of "base64 rank" lines
    llama2_sentencepiece.py  SentencePieceTokenizer   sentencepiece  tokenizer.model, a SentencePiece model

Every format imports this module; this module imports none of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HF_SPECIAL_TOKENS",
    "HF_TOKENIZER",
    "HF_TOKENIZER_CONFIG",
    "MODEL_FILE",
    "ModelFileTokenizer",
    "Tokenizer",
    "encode_threads",
    "model_file_kind",
]

HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
MODEL_FILE = "tokenizer.model"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_threads() -> int:
    """Threads for batch encoding: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Tokenizer(ABC):
    """Text <-> token ids, and how documents are delimited.

    ``vocab_size`` is one more than the largest id the tokenizer can produce: the model's
    embedding needs at least that many rows. ``files`` maps each file's role (its name in a
    checkpoint: ``tokenizer.json``, ``tokenizer.model``, ...) to where it is read from; the
    ``fingerprint`` covers the kind, the files' contents under those names, and the BOS/EOS
    policy, so a copy of the files elsewhere has the same fingerprint.
    """

    kind: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    files: Mapping[str, Path] = {}

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without BOS/EOS; in parallel threads where the library allows."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that are all in ``[0, vocab_size)``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8, and ids past the vocabulary (a model's embedding may have
        more rows than its tokenizer has tokens), become U+FFFD."""
        out, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(int(i))
                continue
            if run:
                out.append(self._decode(run))
                run = []
            out.append("\ufffd")
        if run:
            out.append(self._decode(run))
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids as they go into the training stream: BOS first (where the family puts
        one), EOS last (where the tokenizer has one)."""
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if self.eos_id is not None else []
        return head + ids + tail

    def prompt(self, text: str) -> list[int]:
        """Ids of a prompt for sampling: BOS (where the family puts one), then the text."""
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        return head + self.encode(text)

    @property
    def fingerprint(self) -> str:
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            files = {role: _sha256_file(path) for role, path in sorted(self.files.items())}
            policy = {
                "kind": self.kind,
                "files": files,
                "bos": self.bos_id,
                "eos": self.eos_id,
                "add_bos": self.add_bos,
            }
            cached = self.__dict__["_fingerprint"] = hashlib.sha256(
                json.dumps(policy, sort_keys=True).encode()
            ).hexdigest()[:16]
        return cached

    def describe(self) -> str:
        where = ", ".join(str(p) for p in self.files.values()) or "built in"
        return (
            f"{self.kind} tokenizer ({where}): vocabulary {self.vocab_size}, BOS {self.bos_id if self.add_bos else None}, "
            f"EOS {self.eos_id}, fingerprint {self.fingerprint}"
        )

    def record(self) -> dict[str, Any]:
        """What a training checkpoint's ``meta.json`` says about its tokenizer."""
        return {
            "kind": self.kind, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
            "eos_id": self.eos_id, "add_bos": self.add_bos, "files": sorted(self.files),
        }  # fmt: skip

    # ---- the format: which files it is, how they are read, how they are written ----------------

    @classmethod
    @abstractmethod
    def detect(cls, files: Mapping[str, Path]) -> bool:
        """Whether ``files`` (role -> path, as :func:`~.resolve.find_tokenizer` returns them) hold
        this format. May read the files' first bytes (``OSError`` passes through)."""

    @classmethod
    @abstractmethod
    def load(cls, files: Mapping[str, Path]) -> Tokenizer:
        """The tokenizer ``files`` hold. Raises ``ValueError`` naming a file that is not this format,
        ``ImportError`` when the format's library is not installed."""

    def save(self, out: Path, *, to: str, model_max_length: int | None = None) -> list[str]:
        """Write this tokenizer into the directory ``out`` as a Hugging Face (``to="hf"``:
        ``transformers.AutoTokenizer`` reads it, with ``model_max_length`` in its config) or Meta
        (``to="meta"``, beside ``consolidated.XX.pth``) checkpoint carries it, encoding every text to
        the same ids; returns the names written. Here: its own files, copied."""
        if to not in ("hf", "meta"):
            raise ValueError(f"to: expected 'hf' or 'meta', got {to!r}")
        for role, path in self.files.items():
            shutil.copyfile(path, out / role)
        return sorted(self.files)


class ModelFileTokenizer(Tokenizer):
    """A format read from one ``tokenizer.model`` (:func:`model_file_kind` tells Meta's two apart);
    ``__init__`` takes that file's path. A ``tokenizer.json`` beside it wins."""

    @abstractmethod
    def __init__(self, path: Path) -> None: ...

    @classmethod
    def detect(cls, files: Mapping[str, Path]) -> bool:
        return HF_TOKENIZER not in files and MODEL_FILE in files and model_file_kind(files[MODEL_FILE]) == cls.kind

    @classmethod
    def load(cls, files: Mapping[str, Path]) -> Tokenizer:
        return cls(files[MODEL_FILE])


def model_file_kind(path: Path) -> str:
    """The format of a ``tokenizer.model`` (both Meta formats use the name): ``"tiktoken"`` for a text
    file of ``base64 rank`` lines, else ``"sentencepiece"``."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0]
    parts = first.split()
    if len(parts) == 2 and parts[1].isdigit():
        try:
            base64.b64decode(parts[0], validate=True)
            return "tiktoken"
        except ValueError:
            pass
    return "sentencepiece"
