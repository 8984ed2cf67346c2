"""--data and the token cache (tp_ffn/train/data/: documents.py, token_cache.py, corpus.py): which files and
documents, BOS/EOS framing, a cache built once and reused, rebuilt when the data or the tokenizer
change or when the file is damaged or foreign, and shared by ranks (one builds, the others wait,
a builder's error reaches them, a missing builder times out)."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

import pytest
import torch
from support.rankpool import run_ranks
from support.tokfixtures import SAMPLE, make_hf_tokenizer

from tp_ffn.train import UsageError
from tp_ffn.train.data.corpus import Windows, load_corpus, validation_batch
from tp_ffn.train.data.documents import find_data, iter_documents
from tp_ffn.train.data.token_cache import HEADER_BYTES, CacheOptions, load_tokens, token_file_path
from tp_ffn.train.data.tokenizers import ByteTokenizer, resolve_tokenizer

DOCS = [f"document {i}: " + SAMPLE[i * 7 :] for i in range(12)]


class Counting(ByteTokenizer):
    """Bytes shifted by ``offset`` (so ids can pass 65,535), BOS/EOS at the top; counts encode calls."""

    kind = "counting"

    def __init__(self, offset: int = 3, vocab: int = 300) -> None:
        self.offset, self.vocab_size, self.calls = offset, vocab, 0
        self.bos_id, self.eos_id, self.add_bos = vocab - 2, vocab - 1, True

    def encode_batch(self, texts):
        self.calls += 1
        return [[b + self.offset for b in t.encode()] for t in texts]

    @property
    def fingerprint(self) -> str:
        return f"counting-{self.offset}-{self.vocab_size}"


def _write_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "b.txt").write_text(DOCS[0])
    (root / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[1:6])) + "\n\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "c.txt").write_text(DOCS[6])
    (root / ".hidden.txt").write_text("never read")
    return root


def _expected(tok, texts: list[str]) -> list[int]:
    return [i for t in texts for i in tok.document(tok.encode(t))]


def test_find_data_kinds_and_order(tmp_path):
    root = _write_data(tmp_path / "d")
    src = find_data(str(root))
    assert [p.relative_to(root).as_posix() for p in src.files] == ["a.jsonl", "b.txt", "sub/c.txt"]
    texts = [t for t, _ in iter_documents(src) if t]
    assert texts == [*DOCS[1:6], DOCS[0], DOCS[6]]
    assert sum(n for _, n in iter_documents(src)) == src.total_bytes
    glob = find_data(str(root / "**" / "*.txt"))
    assert [p.name for p in glob.files] == ["b.txt", "c.txt"]
    assert find_data(str(root / "b.txt")).fingerprint != src.fingerprint
    assert find_data(str(root)).fingerprint == src.fingerprint


def test_data_errors(tmp_path):
    with pytest.raises(UsageError, match=r"--data: no such file: .*missing.txt"):
        find_data(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match=r"matches no file"):
        find_data(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"directory .*empty holds no file"):
        find_data(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(UsageError, match=r'bad.jsonl line 2: expected an object with a string "text" field'):
        list(iter_documents(find_data(str(bad))))
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UsageError, match=r"bad.jsonl line 2: not a JSON object"):
        list(iter_documents(find_data(str(bad))))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        list(iter_documents(find_data(str(tmp_path / "latin1.txt"))))


def test_documents_are_framed_and_split(tmp_path):
    root = _write_data(tmp_path / "d")
    tok = Counting()
    c = load_corpus(
        str(root), corpus_bytes=1, val_fraction=0.1, seq_len=16, tokenizer=tok, cache=CacheOptions(tmp_path / "c")
    )
    want = _expected(tok, [*DOCS[1:6], DOCS[0], DOCS[6]])
    assert torch.cat([c.train, c.val]).tolist() == want
    assert c.train.dtype == torch.uint16 and c.val.numel() == int(len(want) * 0.1)
    # Windows and validation sequences work on uint16 tokens as on bytes.
    w = Windows(c.train, 16, seed=1)
    s = int(w.starts(0, 1)[0])
    assert w.batch(0, 1)[0].tolist() == want[s : s + 17]
    assert validation_batch(c.val, 16, 1, 1)[0].tolist() == want[len(c.train) + 16 : len(c.train) + 33]
    # The byte tokenizer: the documents' bytes back to back, no file written.
    b = load_corpus(str(root), corpus_bytes=1, val_fraction=0.1, seq_len=16)
    assert bytes(torch.cat([b.train, b.val]).tolist()) == "".join([*DOCS[1:6], DOCS[0], DOCS[6]]).encode()


def test_cache_built_once_reused_and_rebuilt(tmp_path):
    root = _write_data(tmp_path / "d")
    cache = CacheOptions(tmp_path / "cache")
    tok = Counting()
    first = load_tokens(find_data(str(root)), tok, cache)
    assert tok.calls == 1
    again = load_tokens(find_data(str(root)), tok, cache)
    assert tok.calls == 1 and torch.equal(first, again), "the second load must read the cache"
    # Another tokenizer or other data: another file.
    other = Counting(offset=5)
    assert load_tokens(find_data(str(root)), other, cache)[1].item() == first[1].item() + 2 and other.calls == 1
    (root / "sub" / "c.txt").write_text(DOCS[7])
    changed = load_tokens(find_data(str(root)), tok, cache)
    assert tok.calls == 2 and changed.numel() != first.numel()
    assert len(list((tmp_path / "cache").glob("*.tokens"))) == 3
    # Ids above 65,535: uint32.
    wide = load_tokens(find_data(str(root)), Counting(offset=70_000, vocab=70_300), cache)
    assert wide.dtype == torch.uint32 and wide[1].item() == first[1].item() - 3 + 70_000


def test_the_same_bytes_as_jsonl_and_as_text_are_different_data(tmp_path):
    """A file's bytes read as JSON lines (documents) or as one text: two streams, so two cache
    files, and a checkpoint of one does not resume on the other."""
    lines = "\n".join(json.dumps({"text": d}) for d in DOCS[:4]) + "\n"
    (tmp_path / "docs.jsonl").write_text(lines)
    (tmp_path / "docs.txt").write_text(lines)
    as_jsonl, as_text = find_data(str(tmp_path / "docs.jsonl")), find_data(str(tmp_path / "docs.txt"))
    assert as_jsonl.fingerprint != as_text.fingerprint
    cache, tok = CacheOptions(tmp_path / "cache"), Counting()
    load_tokens(as_text, tok, cache)
    assert load_tokens(as_jsonl, tok, cache).tolist() == _expected(tok, DOCS[:4])
    # Text files keep the fingerprint they had before JSON lines were told apart (their caches and
    # the data fingerprints in checkpoints stay valid): the value the earlier code gave.
    assert as_text.fingerprint == "85251f87cee5fb88"


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "token":
        raw[HEADER_BYTES + 10] ^= 0xFF  # same size, header intact: only the digest can tell
    elif how == "magic":
        raw[0:8] = b"NOTTOKEN"
    elif how == "truncated":
        raw = raw[:-2]
    elif how == "header":
        raw[8:30] = b"{{{{{{{{{{{{{{{{{{{{{{"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["token", "magic", "truncated", "header", "foreign"])
def test_damaged_or_foreign_cache_is_rebuilt(tmp_path, how):
    root = _write_data(tmp_path / "d")
    logs: list[str] = []
    cache = CacheOptions(tmp_path / "cache", log=logs.append)
    tok = Counting()
    src = find_data(str(root))
    good = load_tokens(src, tok, cache).clone()
    path = token_file_path(cache.directory, src, tok)
    if how == "foreign":  # a sound token file of other data, under this data's name
        other_src = find_data(str(root / "b.txt"))
        load_tokens(other_src, tok, cache)
        token_file_path(cache.directory, other_src, tok).replace(path)
    else:
        _damage(path, how)
    tok.calls = 0
    assert torch.equal(load_tokens(src, tok, cache), good)
    assert tok.calls == 1 and "rebuilding" in logs[-2], logs


def _shared(rank: int, world: int, root: str, cache_dir: str, tok_dir: str, fail: bool) -> dict:
    import torch.distributed as dist

    tok = resolve_tokenizer(tok_dir)
    calls = []
    original = tok.encode_batch

    def encode_batch(texts):
        calls.append(len(texts))
        time.sleep(1.0)  # a slow tokenizer: rank 1 must wait for the file
        return original(texts)

    tok.encode_batch = encode_batch
    box = [secrets.token_hex(4)]
    dist.broadcast_object_list(box, src=0)
    data = root if not (fail and rank == 0) else root + "/bad.jsonl"
    opts = CacheOptions(Path(cache_dir), builder=rank == 0, nonce=box[0], timeout=60)
    t0 = time.monotonic()
    try:
        c = load_corpus(data, corpus_bytes=1, val_fraction=0.1, seq_len=16, tokenizer=tok, cache=opts)
    except UsageError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"tokens": torch.cat([c.train, c.val]).tolist(), "calls": len(calls), "seconds": time.monotonic() - t0}


@pytest.mark.timeout(240)
def test_ranks_share_one_cache(tmp_path):
    root = _write_data(tmp_path / "d")
    make_hf_tokenizer(tmp_path / "tok")
    out = run_ranks(2, _shared, str(root), str(tmp_path / "cache"), str(tmp_path / "tok"), False, timeout=180)
    assert out[0]["calls"] > 0 and out[1]["calls"] == 0, "only rank 0 tokenizes"
    assert out[1]["seconds"] > 0.9, "rank 1 waited for the file"
    assert out[0]["tokens"] == out[1]["tokens"]
    tok = resolve_tokenizer(str(tmp_path / "tok"))
    assert out[0]["tokens"][:50] == tok.document(tok.encode(DOCS[1]))[:50]
    assert len(list((tmp_path / "cache").glob("*.tokens"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp-*")), "no temporary file is left"


@pytest.mark.timeout(240)
def test_builder_error_reaches_the_waiting_rank(tmp_path):
    """Rank 0's data is bad: rank 1 stops at once with rank 0's message, not at its 60 s timeout."""
    root = _write_data(tmp_path / "d")
    (root / "bad.jsonl").write_text("[1, 2]\n")
    make_hf_tokenizer(tmp_path / "tok")
    out = run_ranks(2, _shared, str(root), str(tmp_path / "cache"), str(tmp_path / "tok"), True, timeout=180)
    assert out[0]["error"] == out[1]["error"] and "bad.jsonl line 1" in out[1]["error"]
    assert out[1]["seconds"] < 30


def test_stale_files_of_dead_builders_are_removed(tmp_path):
    root = _write_data(tmp_path / "d")
    cache = CacheOptions(tmp_path / "cache", timeout=60)
    src, tok = find_data(str(root)), Counting()
    cache.directory.mkdir()
    path = token_file_path(cache.directory, src, tok)
    old_tmp, new_tmp = Path(f"{path}.tmp-host-1"), Path(f"{path}.tmp-host-2")
    old_fail, new_fail = cache.directory / ".failed-old", cache.directory / ".failed-new"
    for f in (old_tmp, new_tmp, old_fail, new_fail):
        f.write_bytes(b"x")
    for f in (old_tmp, old_fail):
        os.utime(f, (time.time() - 120, time.time() - 120))
    load_tokens(src, tok, cache)
    assert not old_tmp.exists() and not old_fail.exists()
    assert new_tmp.exists() and new_fail.exists(), "a builder that may still be alive keeps its files"


def test_a_long_batch_is_progress_for_the_waiting_ranks(tmp_path):
    """One encode_batch call that lasts longer than the waiters' timeout (a single huge document)
    is not a dead builder: the builder keeps its temporary file fresh while it works."""
    root = _write_data(tmp_path / "d")
    src = find_data(str(root))

    class Slow(Counting):
        def encode_batch(self, texts):
            time.sleep(4.0)
            return super().encode_batch(texts)

    tok, waited = Slow(), {}

    def wait() -> None:
        opts = CacheOptions(tmp_path / "cache", builder=False, nonce="n", timeout=1.5)
        try:
            waited["tokens"] = load_tokens(src, tok, opts).tolist()
        except UsageError as e:
            waited["error"] = str(e)

    (tmp_path / "cache").mkdir()
    waiter = threading.Thread(target=wait)
    waiter.start()
    built = load_tokens(src, tok, CacheOptions(tmp_path / "cache", nonce="n", timeout=1.5)).tolist()
    waiter.join(30)
    assert waited == {"tokens": built}


def test_waiting_without_a_builder_times_out(tmp_path):
    root = _write_data(tmp_path / "d")
    opts = CacheOptions(tmp_path / "cache", builder=False, nonce="x", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"waited 1 s for rank 0 to write .* without progress; is .* on a file system"):
        load_tokens(find_data(str(root)), Counting(), opts)
    assert time.monotonic() - t0 < 10


def test_progress_bar_over_the_input_bytes(tmp_path, capsys):
    root = _write_data(tmp_path / "d")
    src = find_data(str(root))
    load_tokens(src, Counting(), CacheOptions(tmp_path / "cache", progress=True))
    err = capsys.readouterr().err
    assert "tokenize" in err and "100%" in err, err
