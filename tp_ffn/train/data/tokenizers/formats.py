"""The three tokenizer formats of pretrained Llama checkpoints, each on its own library.

    HFTokenizer             tokenizer.json through ``tokenizers`` (Rust; batches encode in parallel threads)
    TiktokenTokenizer       Meta Llama 3's tokenizer.model through ``tiktoken`` (parallel threads)
    SentencePieceTokenizer  Meta Llama 2's tokenizer.model through ``sentencepiece`` (parallel threads)

Each library is imported in its class's constructor only. Errors are ``ValueError`` naming the file.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...tokenizer_base import HF_SPECIAL_TOKENS, HF_TOKENIZER, HF_TOKENIZER_CONFIG, MODEL_FILE, Tokenizer, encode_threads

__all__ = [
    "LLAMA3_PATTERN",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "llama3_special_tokens",
    "read_bpe_ranks",
]

# Meta Llama 3's pre-tokenization: contractions, letter runs with one leading non-letter, digits
# in groups of up to three, punctuation runs with trailing newlines, newline runs, other spaces.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_RESERVED = 256  # special tokens after the BPE ranks: ids n_ranks .. n_ranks + 255


def llama3_special_tokens() -> list[str]:
    """Names of Meta Llama 3's 256 special tokens, in id order (the first follows the last BPE rank).

    Llama 3.1 renamed some reserved slots (``<|eom_id|>``, ``<|python_tag|>``, ...); the ids of
    BOS, EOS, the header markers and ``<|eot_id|>`` are the same.
    """
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_4|>", "<|eot_id|>",
    ]  # fmt: skip
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_RESERVED - len(named) + 5)]


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one ``base64(token) rank`` per line, ranks 0 .. n-1 each once.

    Parsed here (no network, no cache: ``tiktoken.load`` keys a cache in the temp directory by
    path, so a file changed in place could be read stale). Raises ``ValueError`` naming the line.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{path}: line {number}: expected 'base64-token rank', got {line[:60]!r} ({e})"
                ) from None
            if token in ranks:
                raise ValueError(f"{path}: line {number}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: no BPE ranks in the file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: expected ranks 0 .. {len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: expected every single byte among the tokens (a byte-level BPE)")
    return ranks


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` (the ``tokenizers`` library); BOS/EOS named by ``tokenizer_config.json``
    or ``special_tokens_map.json``. Documents start with BOS when the config says
    ``add_bos_token`` or, without that key, when the tokenizer's post-processor adds it."""

    kind = "hf"

    def __init__(self, files: Mapping[str, Path]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = files[HF_TOKENIZER]
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception type
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        # A tokenizer.json may carry truncation or padding settings: never cut or pad a document.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.files = dict(files)
        config = _read_json(files[HF_TOKENIZER_CONFIG]) if HF_TOKENIZER_CONFIG in files else {}
        special = _read_json(files[HF_SPECIAL_TOKENS]) if HF_SPECIAL_TOKENS in files else {}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        ids = {}
        for role in ("bos_token", "eos_token"):
            text = _token_text(config.get(role, special.get(role)))
            if text is not None and text not in vocab:
                raise ValueError(f"{path}: the {role} {text!r} of the tokenizer config is not in the vocabulary")
            ids[role] = None if text is None else vocab[text]
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        if isinstance(config.get("add_bos_token"), bool):
            self.add_bos = config["add_bos_token"] and self.bos_id is not None
        else:
            plain = self._tok.encode("a", add_special_tokens=False).ids
            full = self._tok.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and len(full) > len(plain) and full[0] == self.bos_id
        fast = getattr(self._tok, "encode_batch_fast", None)  # no offsets: faster (tokenizers >= 0.20)
        self._encode_batch = fast if fast is not None else self._tok.encode_batch

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
    """Meta Llama 3's ``tokenizer.model``: BPE ranks for ``tiktoken`` with Meta's pattern and its
    256 special tokens; documents are ``<|begin_of_text|> ... <|end_of_text|>``. Special-token
    text inside a document is encoded as plain text (as Meta's ``encode`` does by default)."""

    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        import tiktoken

        self.ranks = read_bpe_ranks(path)
        n = len(self.ranks)
        self.special_tokens = {name: n + i for i, name in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(
            name=f"llama3-{path.name}", pat_str=LLAMA3_PATTERN, mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )  # fmt: skip
        self.files = {MODEL_FILE: path}
        self.vocab_size = n + LLAMA3_RESERVED
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=encode_threads())

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")


class SentencePieceTokenizer(Tokenizer):
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

    @property
    def processor(self) -> Any:
        """The ``sentencepiece.SentencePieceProcessor`` (pieces, scores, for export)."""
        return self._sp

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=encode_threads())

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)
