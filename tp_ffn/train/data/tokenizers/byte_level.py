"""The byte-level tokenizer: token = UTF-8 byte (vocabulary 256), no file, no library, no specials."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import Tokenizer
from .hf_json import hf_tokenizer_config, ranked_bpe_to_hf, write_hf_tokenizer

__all__ = ["ByteTokenizer"]


class ByteTokenizer(Tokenizer):
    """Token = UTF-8 byte (vocabulary 256), no special tokens: the stream is the text's bytes."""

    kind = "bytes"
    vocab_size = 256

    @classmethod
    def detect(cls, files: Mapping[str, Path]) -> bool:
        return not files

    @classmethod
    def load(cls, files: Mapping[str, Path]) -> ByteTokenizer:
        if files:
            raise ValueError(f"the byte-level tokenizer has no files, got {sorted(files)}")
        return cls()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, out: Path, *, to: str, model_max_length: int | None = None) -> list[str]:
        """``to="hf"``: a ``tokenizer.json`` of the 256 byte tokens (token b is byte b) and its config.
        ``to="meta"``: nothing (Meta's code has no byte tokenizer)."""
        if to != "hf":
            return super().save(out, to=to)  # no files: writes none
        hf = ranked_bpe_to_hf({bytes([b]): b for b in range(256)}, pattern=None, special_tokens={}, bos=None)
        return write_hf_tokenizer(hf, hf_tokenizer_config(model_max_length), out)
