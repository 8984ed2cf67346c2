"""Meta Llama 2's ``tokenizer.model``: a SentencePiece model (a protobuf message, read as data) through
``sentencepiece`` (imported when a tokenizer is read); documents are ``<s> ... </s>``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .base import MODEL_FILE, ModelFileTokenizer, encode_threads
from .hf_json import hf_tokenizer_config, write_tokenizer_config

__all__ = ["SentencePieceTokenizer"]


class SentencePieceTokenizer(ModelFileTokenizer):
    """Meta Llama 2's ``tokenizer.model`` (a SentencePiece model); documents are ``<s> ... </s>``."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(path.read_bytes())
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - RuntimeError or the library's own
            raise ValueError(f"{path}: not a SentencePiece model or a tiktoken BPE file ({e})") from None
        self.files = {MODEL_FILE: path}
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=encode_threads())

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def save(self, out: Path, *, to: str, model_max_length: int | None = None) -> list[str]:
        """``to="meta"``: ``tokenizer.model``, copied. ``to="hf"``: the same file with a
        ``tokenizer_config.json`` for ``transformers``' ``LlamaTokenizer`` (legacy: plain text
        encodes as SentencePiece does)."""
        if to != "hf":
            return super().save(out, to=to)
        sp = self._sp
        shutil.copyfile(self.files[MODEL_FILE], out / MODEL_FILE)
        config = hf_tokenizer_config(model_max_length)
        config.update(
            tokenizer_class="LlamaTokenizer", add_bos_token=self.add_bos, add_eos_token=False, legacy=True,
            bos_token=None if self.bos_id is None else sp.id_to_piece(self.bos_id),
            eos_token=None if self.eos_id is None else sp.id_to_piece(self.eos_id),
            unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        )  # fmt: skip
        return [write_tokenizer_config(config, out), MODEL_FILE]
