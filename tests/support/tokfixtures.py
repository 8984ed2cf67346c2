"""Small tokenizers of all three formats, made by the tests themselves (no download).

make_hf_tokenizer(dir)         tokenizer.json: byte-level BPE trained by ``tokenizers``, Llama-style
                               tokenizer_config.json (<s> / </s>, add_bos_token)
make_tiktoken_file(path)       a Llama 3 style tokenizer.model: BPE ranks learned here, base64 lines
make_sentencepiece_model(path) a Llama 2 style tokenizer.model trained by sentencepiece's trainer
"""

from __future__ import annotations

import base64
import collections
import io
import itertools
import json
import re
import sysconfig
from pathlib import Path

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "def add(a, b):\n    return a + b  # 123 + 4567 = 4690\n"
    "Grüße aus Köln, naïve café; 日本語のテキスト; emoji 🙂 and tabs\there.\n"
    "  leading spaces, trailing spaces   \n\nnew paragraph with <|end_of_text|> and <s> inside.\n"
)


def training_text(limit: int = 120_000) -> str:
    """Text to train the small tokenizers on: the standard library's first sources, and SAMPLE."""
    base = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [SAMPLE * 20], 0
    for name in ("textwrap.py", "string.py", "random.py", "heapq.py", "bisect.py", "calendar.py", "shlex.py"):
        text = (base / name).read_text(encoding="utf-8")
        parts.append(text)
        size += len(text)
        if size > limit:
            break
    return "\n".join(parts)


def make_hf_tokenizer(directory: Path, vocab_size: int = 400, *, add_bos: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(training_text().splitlines(keepends=True), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 256,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


def learn_bpe_ranks(text: str, merges: int = 150) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair, merged, ``merges`` times."""
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    split = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: collections.Counter = collections.Counter()
        for w, parts in split.items():
            for a, b in itertools.pairwise(parts):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return ranks


def make_tiktoken_file(path: Path, merges: int = 150) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = learn_bpe_ranks(training_text(40_000), merges)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_sentencepiece_model(path: Path, vocab_size: int = 400) -> Path:
    """Llama 2's settings: BPE, byte fallback, digits split, no whitespace normalisation, <unk>=0, <s>=1, </s>=2."""
    import sentencepiece

    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in training_text(60_000).splitlines() if ln.strip()]),
        model_writer=out, vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )  # fmt: skip
    path.write_bytes(out.getvalue())
    return path
