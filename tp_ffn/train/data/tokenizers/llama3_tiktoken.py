"""Meta Llama 3's ``tokenizer.model``: tiktoken BPE ranks, one ``base64(token) rank`` per line.

Parsed here as base64 and integers (no code runs, nothing is downloaded); encoding goes through
``tiktoken`` (imported when a tokenizer is read), in parallel threads.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path

from .base import MODEL_FILE, ModelFileTokenizer, encode_threads
from .hf_json import hf_tokenizer_config, ranked_bpe_to_hf, write_hf_tokenizer

__all__ = ["LLAMA3_PATTERN", "TiktokenTokenizer", "llama3_special_tokens", "read_bpe_ranks"]

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


class TiktokenTokenizer(ModelFileTokenizer):
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

    def save(self, out: Path, *, to: str, model_max_length: int | None = None) -> list[str]:
        """``to="meta"``: ``tokenizer.model``, copied. ``to="hf"``: ``tokenizer.json`` (BPE from the
        ranks, Meta's pattern and specials, BOS added) and its config."""
        if to != "hf":
            return super().save(out, to=to)
        names = {i: name for name, i in self.special_tokens.items()}
        bos, eos = names[self.bos_id], names[self.eos_id]  # type: ignore[index]
        hf = ranked_bpe_to_hf(self.ranks, pattern=LLAMA3_PATTERN, special_tokens=self.special_tokens, bos=bos)
        config = {**hf_tokenizer_config(model_max_length), "bos_token": bos, "eos_token": eos}
        return write_hf_tokenizer(hf, config, out)
