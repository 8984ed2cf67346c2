"""The :class:`Tokenizer` interface and the tokenizer file names, which every format builds on.

Below both :mod:`tp_ffn.train.tokenizer` (resolution, bytes) and :mod:`tp_ffn.train.tokenizer_formats`
(the library-backed formats), so that neither imports the other's users.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["HF_SPECIAL_TOKENS", "HF_TOKENIZER", "HF_TOKENIZER_CONFIG", "MODEL_FILE", "Tokenizer", "encode_threads"]

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
