"""Tokenization throughput of the token cache: documents read, encoded (in parallel threads inside
each library), framed with BOS/EOS and written, as ``scripts/train.py`` does on a cache miss.

    python benchmarks/bench_tokenize.py                          # the three formats, 20 MB of stdlib sources
    python benchmarks/bench_tokenize.py --mb 100 --vocab 32000 --json out.json
    python benchmarks/bench_tokenize.py --tokenizer /models/Meta-Llama-3-8B/tokenizer.model --data corpus.jsonl
    taskset -c 0-7 python benchmarks/bench_tokenize.py          # threads = the CPUs the process may use

Without ``--tokenizer`` it makes one tokenizer of each format from the same text (no download): a
byte-level BPE trained by ``tokenizers`` (tokenizer.json), the same merges as tiktoken ranks with
Meta's Llama 3 pattern and specials (tokenizer.model), and a SentencePiece BPE trained by
sentencepiece (Llama 2's settings). It prints, per tokenizer, MB of text per second and tokens per
second for the whole cache build (read + encode + write) and for ``encode_batch`` alone.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tp_ffn.train.data.documents import DataSource
    from tp_ffn.train.data.tokenizers import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=20.0, help="MB of standard-library sources to tokenize (no --data)")
    p.add_argument("--data", default=None, help="a --data spec of train.py instead of the standard library")
    p.add_argument("--tokenizer", default=None, help="a tokenizer path (else the three made here)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the tokenizers made here")
    p.add_argument("--repeats", type=int, default=1, help="time each build this many times, report the best")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _make_tokenizers(root: Path, texts: list[str], vocab: int) -> dict[str, Path]:
    """tokenizer.json, a tiktoken tokenizer.model with the same merges, a SentencePiece tokenizer.model."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tp_ffn.train.data.tokenizers.hf_json import byte_level_alphabet

    hf_dir, tt_dir, sp_dir = root / "hf", root / "tiktoken", root / "sentencepiece"
    for d in (hf_dir, tt_dir, sp_dir):
        d.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    # The BPE's tokens in merge order are tiktoken ranks: every byte first, then each merge's result.
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    pieces = sorted((i, t) for t, i in tok.get_vocab().items() if t not in ("<s>", "</s>"))
    ranks = {bytes([b]): b for b in range(256)}
    for _, t in pieces:
        raw = bytes(to_byte[c] for c in t)
        ranks.setdefault(raw, len(ranks))
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (tt_dir / "tokenizer.model").write_text("\n".join(lines) + "\n")
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for t in texts for ln in t.splitlines() if ln.strip()][:200_000]),
        model_writer=out, vocab_size=vocab, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (sp_dir / "tokenizer.model").write_bytes(out.getvalue())
    return {"hf": hf_dir, "tiktoken": tt_dir, "sentencepiece": sp_dir}


def _bench(name: str, tok: Tokenizer, source: DataSource, repeats: int, scratch: Path) -> dict:
    from tp_ffn.train.data.documents import iter_documents
    from tp_ffn.train.data.token_cache import write_token_file

    texts = [t for t, _ in iter_documents(source) if t]
    best_build = best_encode = float("inf")
    header = {}
    for i in range(repeats):
        path = scratch / f"{name}-{i}.tokens"
        t0 = time.perf_counter()
        header = write_token_file(path, source, tok)
        best_build = min(best_build, time.perf_counter() - t0)
        path.unlink()
        t0 = time.perf_counter()
        tok.encode_batch(texts)
        best_encode = min(best_encode, time.perf_counter() - t0)
    mb = source.total_bytes / 1e6
    return {
        "tokenizer": name, "kind": tok.kind, "vocab": tok.vocab_size, "mb": mb, "documents": header["documents"],
        "tokens": header["count"], "build_s": best_build, "build_mb_per_s": mb / best_build,
        "build_tokens_per_s": header["count"] / best_build, "encode_s": best_encode,
        "encode_mb_per_s": mb / best_encode,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tp_ffn.train.data.corpus import stdlib_source
    from tp_ffn.train.data.documents import find_data, iter_documents
    from tp_ffn.train.data.tokenizers import resolve_tokenizer
    from tp_ffn.train.data.tokenizers.base import encode_threads

    source = find_data(args.data) if args.data else stdlib_source(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        scratch = Path(tmp)
        if args.tokenizer:
            toks = {args.tokenizer: resolve_tokenizer(args.tokenizer)}
        else:
            texts = [t for t, _ in iter_documents(stdlib_source(min(int(args.mb * 1e6), 5_000_000))) if t]
            paths = _make_tokenizers(scratch / "tok", texts, args.vocab)
            toks = {name: resolve_tokenizer(str(p)) for name, p in paths.items()}
        print(f"{source.describe()}; {encode_threads()} encode threads", flush=True)
        print(f"{'tokenizer':<16}{'vocab':>8}{'tokens':>12}{'build MB/s':>12}{'build tok/s':>14}{'encode MB/s':>13}")
        results = []
        for name, tok in toks.items():
            r = _bench(name, tok, source, args.repeats, scratch)
            results.append(r)
            print(
                f"{name:<16}{r['vocab']:>8}{r['tokens']:>12,}{r['build_mb_per_s']:>12.2f}"
                f"{r['build_tokens_per_s']:>14,.0f}{r['encode_mb_per_s']:>13.2f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": encode_threads(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
