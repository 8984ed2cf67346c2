"""The Hugging Face format: ``tokenizer.json`` (the ``tokenizers`` library), and the same file built
for the formats that lack one (:func:`ranked_bpe_to_hf`).

The library is imported when a tokenizer is read or built, never on import. Reading runs no code
from the files: tokenizer.json and its configs are JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import HF_SPECIAL_TOKENS, HF_TOKENIZER, HF_TOKENIZER_CONFIG, Tokenizer

__all__ = [
    "HFTokenizer",
    "byte_level_alphabet",
    "hf_tokenizer_config",
    "ranked_bpe_to_hf",
    "write_hf_tokenizer",
    "write_tokenizer_config",
]


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

    @classmethod
    def detect(cls, files: Mapping[str, Path]) -> bool:
        return HF_TOKENIZER in files

    @classmethod
    def load(cls, files: Mapping[str, Path]) -> HFTokenizer:
        return cls(files)

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


def byte_level_alphabet() -> dict[int, str]:
    """The printable stand-in character of every byte in byte-level BPE vocabularies (GPT-2's
    convention, which ``tokenizers``' ByteLevel uses): printable Latin-1 bytes stand for
    themselves, the other 68 bytes for U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def ranked_bpe_to_hf(
    ranks: dict[bytes, int], *, pattern: str | None, special_tokens: dict[str, int], bos: str | None
) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like tiktoken with these ``ranks``.

    tiktoken merges, within each pre-token, the adjacent pair whose concatenation has the lowest
    rank. As ``tokenizers`` merges: every way ``(left, right)`` of writing a token as two tokens,
    prioritised by the token's rank (then by the parts' ranks), and ``ignore_merges`` so that a
    pre-token which is itself a token maps to it directly, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = byte_level_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    vocab = {text(t): r for t, r in ranks.items()}
    vocab.update(special_tokens)
    model = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True)
    tok = Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level]
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_tokens[bos])]
        )
    return tok


def hf_tokenizer_config(model_max_length: int | None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` entries every written tokenizer shares."""
    config: dict[str, Any] = {} if model_max_length is None else {"model_max_length": model_max_length}
    return {**config, "clean_up_tokenization_spaces": False}


def write_tokenizer_config(config: dict[str, Any], out: Path) -> str:
    """Write ``config`` as ``out/tokenizer_config.json``; returns its name."""
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out / HF_TOKENIZER_CONFIG).write_text(text, encoding="utf-8")
    return HF_TOKENIZER_CONFIG


def write_hf_tokenizer(hf: Any, config: dict[str, Any], out: Path) -> list[str]:
    """Write the ``tokenizers.Tokenizer`` ``hf`` as ``tokenizer.json`` and ``config`` as its
    ``tokenizer_config.json`` (a fast tokenizer for ``transformers``) into ``out``; returns the names."""
    hf.save(str(out / HF_TOKENIZER))
    return [HF_TOKENIZER, write_tokenizer_config({"tokenizer_class": "PreTrainedTokenizerFast", **config}, out)]
