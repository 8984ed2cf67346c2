"""The tokenizer adapters (tp_ffn/train/data/tokenizers/) on small tokenizers of every format made here:
round trips, BOS/EOS framing, Meta's Llama 3 specials and pre-tokenization, how a path or
--init-from is resolved, fingerprints, clear errors for bad files, the Hugging Face export read
back by transformers' AutoTokenizer, and that importing the package loads none of the libraries."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.tokfixtures import SAMPLE, make_hf_tokenizer, make_sentencepiece_model, make_tiktoken_file

from tp_ffn.train import TrainConfig, UsageError
from tp_ffn.train.data.tokenizers import (
    FORMATS,
    ByteTokenizer,
    find_tokenizer,
    resolve_tokenizer,
    tokenizer_from_checkpoint,
)
from tp_ffn.train.data.tokenizers.base import model_file_kind

TEXTS = [
    SAMPLE.replace("<|end_of_text|>", "").replace("<s>", ""),  # special-token text: see test_special_token_text
    "  two  spaces\n\n\tand more 12345 6789012",
    "x",
    " leading space",
    "日本語🙂",
    "",
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    make_hf_tokenizer(root / "hf")
    make_tiktoken_file(root / "tiktoken" / "tokenizer.model")
    make_sentencepiece_model(root / "sentencepiece" / "tokenizer.model")
    return {"hf": root / "hf", "tiktoken": root / "tiktoken", "sentencepiece": root / "sentencepiece"}


def test_each_format_is_one_class_that_detects_only_its_own_files(toks):
    """One class per format: its detect takes its own files and no other format's (a tokenizer.json
    wins over a tokenizer.model beside it), its load reads them, and the kinds a checkpoint may
    record are exactly the formats'."""
    files = {kind: find_tokenizer(toks[kind]) for kind in ("hf", "tiktoken", "sentencepiece")}
    files["bytes"] = {}
    assert sorted(f.kind for f in FORMATS) == sorted(files)
    for fmt in FORMATS:
        assert [kind for kind, found in files.items() if fmt.detect(found)] == [fmt.kind], fmt
        tok = fmt.load(files[fmt.kind])
        assert type(tok) is fmt and tok.kind == fmt.kind
        same = resolve_tokenizer("bytes" if fmt.kind == "bytes" else str(toks[fmt.kind]))
        assert tok.fingerprint == same.fingerprint
    both = {**files["hf"], **files["tiktoken"]}
    assert [fmt.kind for fmt in FORMATS if fmt.detect(both)] == ["hf"]


@pytest.mark.parametrize("kind", ["hf", "tiktoken", "sentencepiece", "bytes"])
def test_round_trip_and_framing(toks, kind):
    tok = resolve_tokenizer("bytes" if kind == "bytes" else str(toks[kind]))
    assert tok.kind == kind
    batch = tok.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, batch):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    if kind != "bytes":
        assert len(batch[0]) < 0.85 * len(TEXTS[0].encode()), "a BPE should merge something"
        doc = tok.document(batch[2])
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and doc[1:-1] == batch[2]
        assert tok.prompt("x") == [tok.bos_id, *batch[2]]
    else:
        assert tok.document([104, 105]) == [104, 105] and tok.vocab_size == 256
    # Ids past the tokenizer's vocabulary (a padded embedding) decode to U+FFFD instead of failing.
    assert tok.decode([*batch[2], tok.vocab_size + 3]) == "x\ufffd"


def test_llama2_and_llama3_conventions(toks):
    sp = resolve_tokenizer(str(toks["sentencepiece"]))
    assert (sp.bos_id, sp.eos_id, sp.add_bos) == (1, 2, True)  # <s>, </s>
    tt = resolve_tokenizer(str(toks["tiktoken"] / "tokenizer.model"))
    n = sum(1 for line in (toks["tiktoken"] / "tokenizer.model").read_text().splitlines() if line)
    assert tt.vocab_size == n + 256 and (tt.bos_id, tt.eos_id) == (n, n + 1)
    assert tt.decode([tt.bos_id, tt.eos_id]) == "<|begin_of_text|><|end_of_text|>"
    assert tt.decode([n + 9]) == "<|eot_id|>" and tt.decode([n + 255]) == "<|reserved_special_token_250|>"


def test_llama3_pretokenization_groups_digits_by_three(tmp_path):
    """Meta's pattern splits digit runs into groups of at most three before BPE: with merges that
    could make "1234" and "1234567", "1234567" still encodes as 123 | 4 56 | 7."""
    ranks = {bytes([b]): b for b in range(256)}
    for t in (b"12", b"123", b"1234", b"56", b"567", b"1234567"):
        ranks[t] = len(ranks)
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tt = resolve_tokenizer(str(path))
    assert [tt.decode([i]) for i in tt.encode("1234567")] == ["123", "4", "56", "7"]
    assert [tt.decode([i]) for i in tt.encode("x 1234567")] == ["x", " ", "123", "4", "56", "7"]


def test_special_token_text(toks):
    """Text that spells a special token: Meta's tiktoken encode treats it as text (like Meta's
    ``encode`` default); ``tokenizers`` maps added tokens in text to their ids (as HF does)."""
    tt = resolve_tokenizer(str(toks["tiktoken"]))
    assert tt.bos_id not in tt.encode("<|begin_of_text|>")
    hf = resolve_tokenizer(str(toks["hf"]))
    assert hf.encode("a<s>b").count(hf.bos_id) == 1


def test_hf_bos_policy(tmp_path):
    """BOS comes from tokenizer_config.json's add_bos_token, else from what the post-processor adds."""
    make_hf_tokenizer(tmp_path / "with", add_bos=True)
    make_hf_tokenizer(tmp_path / "without", add_bos=False)
    assert resolve_tokenizer(str(tmp_path / "with")).add_bos
    plain = resolve_tokenizer(str(tmp_path / "without"))
    assert not plain.add_bos and plain.document([5]) == [5, plain.eos_id]
    cfg = json.loads((tmp_path / "without" / "tokenizer_config.json").read_text())
    (tmp_path / "without" / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    assert resolve_tokenizer(str(tmp_path / "without")).add_bos


def test_resolution(toks, tmp_path):
    assert resolve_tokenizer("auto").kind == "bytes"
    assert resolve_tokenizer("auto", init_from=toks["hf"]).kind == "hf"
    assert resolve_tokenizer(str(toks["hf"] / "tokenizer.json")).kind == "hf"
    assert model_file_kind(toks["tiktoken"] / "tokenizer.model") == "tiktoken"
    assert model_file_kind(toks["sentencepiece"] / "tokenizer.model") == "sentencepiece"
    # A Meta Llama 2 download keeps tokenizer.model beside the model directories.
    meta = tmp_path / "llama" / "llama-2-7b"
    meta.mkdir(parents=True)
    (meta / "params.json").write_text("{}")
    shutil.copy(toks["sentencepiece"] / "tokenizer.model", meta.parent / "tokenizer.model")
    assert resolve_tokenizer("auto", init_from=meta).kind == "sentencepiece"
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UsageError, match=r"--init-from .*bare holds no tokenizer .*--tokenizer bytes"):
        resolve_tokenizer("auto", init_from=bare)
    with pytest.raises(UsageError, match=r"--tokenizer .*nope: no such file"):
        resolve_tokenizer(str(tmp_path / "nope"))


def test_fingerprint_follows_contents_not_location(toks, tmp_path):
    a = resolve_tokenizer(str(toks["tiktoken"]))
    copy = tmp_path / "elsewhere.model"
    shutil.copy(toks["tiktoken"] / "tokenizer.model", copy)
    assert resolve_tokenizer(str(copy)).fingerprint == a.fingerprint
    lines = copy.read_text().splitlines()
    copy.write_text("\n".join(lines[:-1]) + "\n")  # one merge fewer
    assert resolve_tokenizer(str(copy)).fingerprint != a.fingerprint
    assert ByteTokenizer().fingerprint == ByteTokenizer().fingerprint != a.fingerprint


def test_bad_files_are_one_line_errors(tmp_path, toks):
    bad = tmp_path / "tokenizer.model"
    good = (toks["tiktoken"] / "tokenizer.model").read_text().splitlines()
    bad.write_text("\n".join([*good[:5], "Zm9v notanumber", *good[5:]]))
    with pytest.raises(UsageError, match=r"line 6: expected 'base64-token rank'"):
        resolve_tokenizer(str(bad))
    bad.write_text("\n".join(good[:-2] + [good[-1]]))  # a rank is missing
    with pytest.raises(UsageError, match=r"expected ranks 0 \.\. \d+, each once"):
        resolve_tokenizer(str(bad))
    bad.write_bytes(b"\x08\x01garbage that is no protobuf" * 3)
    with pytest.raises(UsageError, match=r"not a SentencePiece model or a tiktoken BPE file"):
        resolve_tokenizer(str(bad))
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(UsageError, match=r"not a Hugging Face tokenizer.json"):
        resolve_tokenizer(str(tmp_path / "tokenizer.json"))
    ranks = tmp_path / "no-bytes.model"
    ranks.write_text(f"{base64.b64encode(b'a').decode()} 0\n")
    with pytest.raises(UsageError, match=r"every single byte"):
        resolve_tokenizer(str(ranks))


def test_vocabulary_must_fit_the_embedding(toks):
    tok = resolve_tokenizer(str(toks["tiktoken"]))
    model = TrainConfig().model_config()  # the tiny preset: 256 rows
    with pytest.raises(UsageError, match=rf"vocab_size \(256\) must be >= {tok.vocab_size} for its tiktoken tokenizer"):
        TrainConfig().check_model(model, token_ids=tok.vocab_size, tokens=f"its {tok.kind} tokenizer")
    TrainConfig().check_model(model.updated(vocab_size=tok.vocab_size), token_ids=tok.vocab_size)


@pytest.mark.parametrize("kind", ["hf", "tiktoken", "sentencepiece", "bytes"])
def test_hf_export_loads_in_transformers_with_the_same_ids(toks, tmp_path, kind):
    from transformers import AutoTokenizer

    tok = resolve_tokenizer("bytes" if kind == "bytes" else str(toks[kind]))
    names = tok.save(tmp_path, to="hf", model_max_length=128)
    assert all((tmp_path / n).is_file() for n in names)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == ((tok.bos_id if tok.add_bos else None), tok.eos_id)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf(text)["input_ids"] == tok.prompt(text)
        assert hf.decode(tok.encode(text)) == text
    meta = tmp_path / "meta"
    meta.mkdir()
    written = tok.save(meta, to="meta")
    expected = {"hf": sorted(tok.files), "bytes": []}.get(kind, ["tokenizer.model"])
    assert written == expected and sorted(p.name for p in meta.iterdir()) == expected


def test_checkpoint_copy_is_checked(toks, tmp_path):
    """A training checkpoint's tokenizer copy is read back and its fingerprint checked."""
    step = tmp_path / "step_00000001"
    step.mkdir()
    tok = resolve_tokenizer(str(toks["hf"]))
    for name, path in tok.files.items():
        shutil.copy(path, step / name)
    meta = {"format": "tp_ffn.train.checkpoint/1", "step": 1, "tokenizer": tok.record()}
    (step / "meta.json").write_text(json.dumps(meta))
    assert tokenizer_from_checkpoint(step).fingerprint == tok.fingerprint
    assert resolve_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint  # a --ckpt-dir as --tokenizer
    (step / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<unk>"}))
    with pytest.raises(UsageError, match=r"is damaged: its tokenizer files give hf fingerprint"):
        tokenizer_from_checkpoint(step)
    (step / "meta.json").write_text(json.dumps({**meta, "tokenizer": {**tok.record(), "files": ["../x"]}}))
    with pytest.raises(UsageError, match=r"lists tokenizer file '\.\./x'"):
        tokenizer_from_checkpoint(step)


@pytest.mark.slow
def test_importing_the_package_loads_no_tokenizer_library():
    code = (
        "import sys, tp_ffn, tp_ffn.train, tp_ffn.train.run.trainer, tp_ffn.train.data.corpus\n"
        "import tp_ffn.train.run.export\n"
        "loaded = [m for m in ('tokenizers', 'tiktoken', 'sentencepiece', 'transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def test_reading_a_tokenizer_runs_no_code_from_its_directory(toks, tmp_path):
    """A tokenizer directory asking for custom code (transformers' auto_map) is read as data: the
    code is never imported."""
    d = tmp_path / "remote"
    shutil.copytree(toks["hf"], d)
    marker = tmp_path / "ran"
    (d / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = resolve_tokenizer("auto", init_from=d)
    assert tok.decode(tok.encode("safe")) == "safe" and not marker.exists()
