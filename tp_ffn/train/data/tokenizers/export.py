"""A training run's tokenizer written the way Hugging Face or Meta checkpoints carry it.

    kind            --to hf                                              --to meta
    hf              its files, copied                                    its files, copied
    tiktoken        tokenizer.json (BPE from the ranks, Meta's pattern,  tokenizer.model, copied
                    specials) + tokenizer_config.json
    sentencepiece   tokenizer.model + tokenizer_config.json              tokenizer.model, copied
                    (LlamaTokenizer, legacy: plain text encodes as SentencePiece does)
    bytes           tokenizer.json (256 byte tokens) + config            nothing (Meta's code has no byte tokenizer)

The written files encode every text to the ids the training run used (tested against
``transformers.AutoTokenizer``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .resolve import HF_TOKENIZER, HF_TOKENIZER_CONFIG, MODEL_FILE, Tokenizer

__all__ = ["byte_level_alphabet", "ranked_bpe_to_hf", "save_hf_tokenizer", "save_meta_tokenizer"]


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


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_files(tok: Tokenizer, out: Path) -> list[str]:
    for role, path in tok.files.items():
        shutil.copyfile(path, out / role)
    return sorted(tok.files)


def save_hf_tokenizer(tok: Tokenizer, out: Path, *, model_max_length: int) -> list[str]:
    """Write ``tok`` as Hugging Face tokenizer files into ``out``; returns their names."""
    if tok.kind == "hf":
        return _copy_files(tok, out)
    config: dict[str, Any] = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if tok.kind == "sentencepiece":
        from .formats import SentencePieceTokenizer

        assert isinstance(tok, SentencePieceTokenizer)
        sp = tok.processor
        shutil.copyfile(tok.files[MODEL_FILE], out / MODEL_FILE)
        config.update(
            tokenizer_class="LlamaTokenizer", add_bos_token=tok.add_bos, add_eos_token=False, legacy=True,
            bos_token=None if tok.bos_id is None else sp.id_to_piece(tok.bos_id),
            eos_token=None if tok.eos_id is None else sp.id_to_piece(tok.eos_id),
            unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        )  # fmt: skip
        _write_json(config, out / HF_TOKENIZER_CONFIG)
        return [HF_TOKENIZER_CONFIG, MODEL_FILE]
    if tok.kind == "tiktoken":
        from .formats import LLAMA3_PATTERN, TiktokenTokenizer

        assert isinstance(tok, TiktokenTokenizer)
        names = {i: name for name, i in tok.special_tokens.items()}
        bos, eos = names[tok.bos_id], names[tok.eos_id]  # type: ignore[index]
        hf = ranked_bpe_to_hf(tok.ranks, pattern=LLAMA3_PATTERN, special_tokens=tok.special_tokens, bos=bos)
        config.update(bos_token=bos, eos_token=eos)
    else:  # bytes: token b is byte b
        hf = ranked_bpe_to_hf({bytes([b]): b for b in range(256)}, pattern=None, special_tokens={}, bos=None)
    hf.save(str(out / HF_TOKENIZER))
    _write_json({"tokenizer_class": "PreTrainedTokenizerFast", **config}, out / HF_TOKENIZER_CONFIG)
    return [HF_TOKENIZER, HF_TOKENIZER_CONFIG]


def save_meta_tokenizer(tok: Tokenizer, out: Path) -> list[str]:
    """Write ``tok`` beside Meta's ``consolidated.XX.pth`` files; returns the names written."""
    if tok.kind == "bytes":
        return []
    return _copy_files(tok, out)
