"""Hostile inputs other than training checkpoints: Hugging Face / Meta configs and weight files, ``--data``
files, the metrics file a resume reads, and what lies in a ``--ckpt-dir``.

Each case ends in a ``ValueError`` / ``UsageError`` that names the file (one line from the scripts),
before anything large is allocated or anything waits forever; each has a negative control (the
intact input passes the same call).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from support.scriptmain import script_error

from tp_ffn.models import LlamaConfig, Transformer, config_from_pretrained, export_hf, export_meta
from tp_ffn.models.config_bounds import ROPE_FLOOR_ELEMENTS
from tp_ffn.models.pretrained_config import JSON_MAX_BYTES
from tp_ffn.train import UsageError
from tp_ffn.train.checkpoint import store as ck
from tp_ffn.train.data import corpus as data_mod
from tp_ffn.train.data.corpus import load_corpus
from tp_ffn.train.run.metrics import MetricsLog, read_metrics

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    root = tmp_path_factory.mktemp("pretrained")
    export_hf(model, root / "hf")
    export_meta(model, root / "meta", num_shards=2)
    return {"hf": root / "hf", "meta": root / "meta"}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------------
# Hugging Face config.json and Meta params.json


HF_CONFIG_CASES = {
    # sizes that would allocate far more than the weights hold: refused before any model is built
    "huge-dim": ({"hidden_size": 2**20, "intermediate_size": 2**22, "head_dim": None}, r"config\.json describes [\d,]+ parameters .* but the stored weights hold [\d,]+ elements; refusing to build it"),
    "many-layers": ({"num_hidden_layers": 10**6}, r"config\.json describes [\d,]+ parameters \(dim 64, 1000000 layers"),
    "huge-vocab": ({"vocab_size": 10**9}, r"config\.json describes [\d,]+ parameters .*vocab 1000000000\)"),
    "huge-context": ({"max_position_embeddings": 10**12}, r"config\.json asks for max_seq_len 1000000000000 x head_dim 16 = [\d,]+ rotary-table elements"),
    # absurd values caught by the config's own checks, now naming the file
    "negative-vocab": ({"vocab_size": -5}, r"config\.json: LlamaConfig\.vocab_size: expected a positive int, got -5"),
    "zero-layers": ({"num_hidden_layers": 0}, r"config\.json: LlamaConfig\.n_layers: expected a positive int"),
    "nan-eps": ({"rms_norm_eps": float("nan")}, r"config\.json: rms_norm_eps: expected a finite number > 0, got nan"),
    "string-theta": ({"rope_theta": "1e4"}, r"config\.json: rope_theta: expected a finite number > 0, got '1e4'"),
    "dict-eps": ({"rms_norm_eps": {"a": 1}}, r"config\.json: rms_norm_eps: expected a finite number > 0"),
    "float-context": ({"max_position_embeddings": 64.5}, r"config\.json: max_position_embeddings: expected an int, got 64\.5"),
    "list-head-dim": ({"head_dim": [16]}, r"config\.json: head_dim: expected an int, got \[16\]"),
}  # fmt: skip


META_PARAMS_CASES = {
    "huge-dim": ({"dim": 2**20, "n_heads": 4}, r"params\.json describes [\d,]+ parameters"),
    "many-layers": ({"n_layers": 10**6}, r"params\.json describes [\d,]+ parameters \(dim 64, 1000000 layers"),
    "negative-dim": ({"dim": -64}, r"params\.json: LlamaConfig\.dim: expected a positive int"),
    "string-eps": ({"norm_eps": "small"}, r"params\.json: norm_eps: expected a finite number > 0, got 'small'"),
    "infinite-multiplier": ({"ffn_dim_multiplier": float("inf")}, r"params\.json: ffn_dim_multiplier: expected a finite number > 0, got inf"),
}  # fmt: skip


CONFIG_CASES = {
    **{("hf", k): v for k, v in HF_CONFIG_CASES.items()},
    **{("meta", k): v for k, v in META_PARAMS_CASES.items()},
}


@pytest.mark.parametrize("fmt, case", sorted(CONFIG_CASES))
def test_config_that_lies_is_refused_before_building(pretrained, tmp_path, fmt, case):
    change, pattern = CONFIG_CASES[(fmt, case)]
    d = _copy(pretrained[fmt], tmp_path / fmt)
    _edit_json(d / ("config.json" if fmt == "hf" else "params.json"), **change)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=pattern):
        config_from_pretrained(d)
    assert time.perf_counter() - t0 < 10  # nothing of the described size was built
    assert config_from_pretrained(pretrained[fmt]).hidden_dim == CFG.hidden_dim  # negative control


def test_the_rope_allowance_keeps_real_contexts(pretrained, tmp_path):
    """Llama 3.1 asks for 131072 positions at head_dim 128: within the floor, whatever the weights."""
    assert 131072 * 128 <= ROPE_FLOOR_ELEMENTS
    d = _copy(pretrained["hf"], tmp_path / "hf")
    _edit_json(d / "config.json", max_position_embeddings=ROPE_FLOOR_ELEMENTS // CFG.head_dim)
    assert config_from_pretrained(d).max_seq_len == ROPE_FLOOR_ELEMENTS // CFG.head_dim


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_config_file_that_is_not_a_small_regular_file(pretrained, tmp_path, name):
    fmt = "hf" if name == "config.json" else "meta"
    d = _copy(pretrained[fmt], tmp_path / fmt)
    good = (d / name).read_bytes()
    (d / name).unlink()
    os.mkfifo(d / name)  # open() would wait for a writer forever
    with pytest.raises(ValueError, match=rf"{name}: the .* is not a regular file \(a FIFO\)"):
        config_from_pretrained(d)
    (d / name).unlink()
    with open(d / name, "wb") as f:
        f.truncate(JSON_MAX_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(ValueError, match=rf"{name}: {JSON_MAX_BYTES + 1} bytes is far more than"):
        config_from_pretrained(d)
    (d / name).write_bytes(b"[" * 100_000 + b"]" * 100_000)  # nesting deeper than the parser's recursion
    with pytest.raises(ValueError, match=rf"{name}: cannot read the .*RecursionError"):
        config_from_pretrained(d)
    (d / name).write_bytes(b'{"dim": 64, \xff}')
    with pytest.raises(ValueError, match=rf"{name}: cannot read the "):
        config_from_pretrained(d)
    (d / name).write_bytes(good)
    assert config_from_pretrained(d).dim == CFG.dim  # negative control


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_init_from_a_lying_config_is_one_line(pretrained, tmp_path):
    d = _copy(pretrained["hf"], tmp_path / "hf")
    _edit_json(d / "config.json", num_hidden_layers=10**6)
    argv = ["--init-from", str(d), "--tokenizer", "bytes", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--corpus-bytes", "20000", "--no-progress"]  # fmt: skip
    error = script_error("train.py", argv)
    assert error is not None and error.startswith(f"--init-from {d}: {d / 'config.json'} describes"), error
    assert script_error("train.py", ["--init-from", str(pretrained["hf"]), *argv[2:]]) is None  # negative control


# --------------------------------------------------------------------------------------------------
# safetensors headers: the library refuses what lies; the message names the file


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    new_header, length = edit(header)
    blob = json.dumps(new_header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + body)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


SAFETENSORS_CASES = {
    "huge-header-length": (lambda h: (h, 10**15), "header too large"),
    "header-past-end": (lambda h: (h, 10**7), "invalid header length"),
    "offsets-out-of-range": (lambda h: ({**h, _first(h): {**h[_first(h)], "data_offsets": [0, 10**12]}}, None), "invalid shape, data type, or offset"),
    "shape-lies": (lambda h: ({**h, _first(h): {**h[_first(h)], "shape": [10**6, 10**6]}}, None), "invalid shape, data type, or offset"),
    "unknown-dtype": (lambda h: ({**h, _first(h): {**h[_first(h)], "dtype": "PICKLE"}}, None), "unknown variant `PICKLE`"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_header_that_lies_is_refused(pretrained, tmp_path, case):
    edit, reason = SAFETENSORS_CASES[case]
    d = _copy(pretrained["hf"], tmp_path / "hf")
    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(ValueError, match=rf"model\.safetensors: not a readable safetensors file: .*{reason}"):
        config_from_pretrained(d)
    assert config_from_pretrained(pretrained["hf"]).hidden_dim == CFG.hidden_dim  # negative control


def test_safetensors_index_naming_files_outside_is_refused(pretrained, tmp_path):
    d = _copy(pretrained["hf"], tmp_path / "hf")
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(outside)
    from safetensors import safe_open

    with safe_open(str(outside), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: names files outside"):
        config_from_pretrained(d)
    # Negative control: the same file inside the directory, named plainly, is read.
    outside.rename(d / "shard.safetensors")
    index["weight_map"] = {k: "shard.safetensors" for k in names}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert config_from_pretrained(d).hidden_dim == CFG.hidden_dim


# --------------------------------------------------------------------------------------------------
# --data files


def _corpus(path: str):
    return load_corpus(path, corpus_bytes=1, val_fraction=0.1, seq_len=16)


def test_data_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    inside = tmp_path / "dir"  # a --data directory holding a FIFO, a link to a device and a link loop
    inside.mkdir()
    (inside / "a.txt").write_text("text " * 100)
    os.mkfifo(inside / "b.txt")
    with_device, with_loop = tmp_path / "dir2", tmp_path / "dir3"
    with_device.mkdir()
    (with_device / "zero.txt").symlink_to("/dev/zero")
    with_loop.mkdir()
    (with_loop / "x.txt").symlink_to(with_loop / "x.txt")
    cases = {
        str(fifo): r"--data: .*fifo is not a regular file \(a FIFO\); expected regular files of UTF-8 text or JSON lines",
        "/dev/zero": r"--data: /dev/zero is not a regular file \(a character device\); expected regular files",
        str(loop): r"--data: .*loop cannot be read \(Too many levels of symbolic links\)",
        str(inside): r"--data: .*dir/b\.txt is not a regular file \(a FIFO\)",
        str(with_device): r"--data: .*dir2/zero\.txt is not a regular file \(a character device\)",
        str(with_loop): r"--data: .*dir3/x\.txt cannot be read \(Too many levels of symbolic links\)",
    }
    for path, pattern in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(UsageError, match=pattern):
            _corpus(path)
        assert time.perf_counter() - t0 < 5, path
    (inside / "b.txt").unlink()
    assert _corpus(str(inside)).train.numel() > 0  # negative control: the same directory without the FIFO


def test_jsonl_nested_deeper_than_the_parser_is_one_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "fine " * 50}) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(UsageError, match=r"d\.jsonl line 2: not a JSON object \(maximum recursion depth"):
        _corpus(str(f))
    f.write_text(json.dumps({"text": "fine " * 50}) + "\n")
    assert _corpus(str(f)).train.numel() > 0  # negative control


def test_data_larger_than_memory_allows_is_refused_before_reading(tmp_path, monkeypatch):
    f = tmp_path / "big.txt"
    f.write_text("a" * 5000)
    monkeypatch.setattr(data_mod, "memory_bytes", lambda: 16_000)  # a machine with 16 kB: at most 4 kB of data
    with pytest.raises(UsageError, match=r"--data: .*big\.txt is 0\.0 GiB; the byte-level corpus is held in memory"):
        _corpus(str(f))
    monkeypatch.setattr(data_mod, "memory_bytes", lambda: 40_000)
    assert _corpus(str(f)).train.numel() > 0  # negative control


def test_non_utf8_data_names_the_byte(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("é".encode() * 100 + b"\xc3(" + b"a" * 100)
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 200: invalid continuation byte\)"):
        _corpus(str(f))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_with_a_fifo_as_data_is_one_line(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = script_error("train.py", ["--data", str(fifo), "--steps", "1"])
    assert error is not None and "is not a regular file (a FIFO)" in error


# --------------------------------------------------------------------------------------------------
# What else a resume reads: metrics.jsonl, and the entries of --ckpt-dir


def test_metrics_file_with_foreign_lines_is_read_without_failing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    lines = [json.dumps(good[0]), "5", "[1, 2]", '{"step": "x"}', "[" * 100_000, json.dumps(good[1])]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 9, "x": "\xff"}\n' + json.dumps(good[2]).encode())
    assert read_metrics(path) == good
    MetricsLog(path, resume_step=2).close()
    assert read_metrics(path) == good[:2]


def test_ckpt_dir_entries_that_are_links_are_not_followed_into(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    ckpt_dir = tmp_path / "ck"
    ckpt_dir.mkdir()
    (ckpt_dir / ".tmp-step_00000001-abcd").symlink_to(victim)  # looks like a leftover of a crashed save
    (ckpt_dir / "step_00000005").symlink_to(ckpt_dir / "step_00000005")  # a link loop named like a checkpoint
    assert ck.find_latest(ckpt_dir) == (None, [])
    assert ck.remove_stale_tmp(ckpt_dir) == []
    assert (victim / "precious").read_text() == "keep me"
    # Negative control: a real leftover directory is removed.
    (ckpt_dir / ".tmp-step_00000002-ef01").mkdir()
    assert ck.remove_stale_tmp(ckpt_dir) == [ckpt_dir / ".tmp-step_00000002-ef01"]
