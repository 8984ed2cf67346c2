"""The training job's pieces in one process: argument validation, data order, schedule, block
layout, metrics file and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tp_ffn.train import TrainConfig, UsageError, parse_args
from tp_ffn.train.checkpoint.layout import chunk_bounds, param_blocks
from tp_ffn.train.config import parse_model_args
from tp_ffn.train.data.corpus import Windows, load_corpus, stdlib_sources, validation_batch
from tp_ffn.train.run.metrics import MetricsLog, plot_metrics, read_metrics
from tp_ffn.train.run.optim import WarmupCosine


def test_parse_args_defaults_and_flags():
    cfg = parse_args(
        [
            "--tp",
            "2",
            "--steps",
            "7",
            "--sequence-parallel",
            "--dtype",
            "bfloat16",
            "--model-args",
            "n_layers=3,ffn_dim_multiplier=1.3",
        ]
    )
    assert (cfg.tp, cfg.dp, cfg.steps, cfg.sequence_parallel, cfg.dtype) == (2, None, 7, True, "bfloat16")
    assert cfg.model_args == {"n_layers": 3, "ffn_dim_multiplier": 1.3}
    assert cfg.model_config().n_layers == 3
    assert parse_args(["--ckpt-dir", "d"]).metrics_path.as_posix() == "d/metrics.jsonl"
    assert parse_args([]).metrics_path is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tp", "0"], r"--tp: expected an int >= 1, got 0"),
        (["--dtype", "float16"], r"argument --dtype: invalid choice"),
        (["--preset", "huge"], r"--preset: expected one of"),
        (["--resume"], r"--resume: needs --ckpt-dir"),
        (["--ckpt-every", "5"], r"--ckpt-every 5: needs --ckpt-dir"),
        (["--metrics", "m.csv"], r"--metrics: expected a path ending in .jsonl"),
        (["--model-args", "layers=3"], r"--model-args: expected KEY=VALUE with KEY one of"),
        (["--model-args", "dim=big"], r"--model-args: dim expects a number"),
        (
            ["--model-args", "dim=100,n_heads=8"],
            r"--model-args: LlamaConfig: dim \(100\) must be divisible by n_heads \(8\)",
        ),
        (["--steps", "ten"], r"argument --steps: invalid int value"),
        (["--min-lr-ratio", "2"], r"--min-lr-ratio: expected a value in \[0, 1\]"),
        (["--ffn-comm-chunks", "0"], r"--ffn-comm-chunks: expected an int >= 1, got 0"),
        (
            ["--ffn-comm-chunks", "2", "--sequence-parallel", "--tp", "2"],
            r"--ffn-comm-chunks: expected 1 with --sequence-parallel",
        ),
    ],
)
def test_bad_arguments(argv, message):
    with pytest.raises(UsageError, match=message):
        cfg = parse_args(argv)
        cfg.model_config()


def test_ffn_mode_flags():
    assert (parse_args([]).ffn_fuse_gate_up, parse_args([]).ffn_overlap_comm, parse_args([]).ffn_comm_chunks) == (
        False,
        True,
        1,
    )
    cfg = parse_args(["--ffn-fuse-gate-up", "--no-ffn-overlap", "--ffn-comm-chunks", "4"])
    assert (cfg.ffn_fuse_gate_up, cfg.ffn_overlap_comm, cfg.ffn_comm_chunks) == (True, False, 4)


def test_plan_splits_world_and_batch():
    cfg = TrainConfig(tp=2, batch_size=16, micro_batch_size=2)
    p = cfg.plan(8)
    assert (p.dp, p.micro_batch, p.grad_accum) == (4, 2, 2)
    assert TrainConfig(tp=1, batch_size=8).plan(4).micro_batch == 2
    with pytest.raises(UsageError, match=r"--tp \(2\) x --dp \(3\) = 6 must equal the world size \(4\)"):
        TrainConfig(tp=2, dp=3).plan(4)
    with pytest.raises(UsageError, match=r"--tp \(3\) must divide the world size \(4\)"):
        TrainConfig(tp=3).plan(4)
    with pytest.raises(UsageError, match=r"--batch-size \(10\) must be divisible by dp \(4\)"):
        TrainConfig(batch_size=10).plan(4)
    with pytest.raises(
        UsageError, match=r"--batch-size \(8\) must be divisible by --micro-batch-size \(3\) x dp \(2\)"
    ):
        TrainConfig(batch_size=8, micro_batch_size=3).plan(2)


def test_check_model():
    tiny = TrainConfig().model_config()
    with pytest.raises(UsageError, match=r"--tp: n_heads \(4\) and n_kv_heads \(2\) must both be divisible .* tp=4"):
        TrainConfig(tp=4).check_model(tiny)
    with pytest.raises(UsageError, match=r"--seq-len \(512\) must be <= the model's max_seq_len \(256\)"):
        TrainConfig(seq_len=512).check_model(tiny)
    with pytest.raises(UsageError, match=r"--sequence-parallel: --seq-len \(33\) must be divisible by --tp \(2\)"):
        TrainConfig(tp=2, seq_len=33, sequence_parallel=True).check_model(tiny)
    with pytest.raises(UsageError, match=r"vocab_size \(128\) must be >= 256"):
        TrainConfig().check_model(tiny.updated(vocab_size=128))
    assert parse_model_args("n_kv_heads=none") == {"n_kv_heads": None}


def test_stdlib_corpus_is_deterministic():
    files = stdlib_sources()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    a = load_corpus(None, corpus_bytes=100_000, val_fraction=0.1, seq_len=32)
    b = load_corpus(None, corpus_bytes=100_000, val_fraction=0.1, seq_len=32)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train)
    assert a.train.numel() == 90_000 and a.val.numel() == 10_000


def test_user_data_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld\n" * 200, encoding="utf-8")
    c = load_corpus(str(f), corpus_bytes=1, val_fraction=0.25, seq_len=16)
    assert bytes(torch.cat([c.train, c.val]).tolist()) == f.read_bytes()
    with pytest.raises(UsageError, match=r"--data: no such file"):
        load_corpus(str(tmp_path / "nope.txt"), corpus_bytes=1, val_fraction=0.1, seq_len=16)
    (tmp_path / "bin").write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(UsageError, match=r"is not UTF-8 text"):
        load_corpus(str(tmp_path / "bin"), corpus_bytes=1, val_fraction=0.1, seq_len=16)
    with pytest.raises(UsageError, match=r"too few for --seq-len 4096"):
        load_corpus(str(f), corpus_bytes=1, val_fraction=0.1, seq_len=4096)


def test_windows_position_is_the_whole_state():
    data = torch.arange(1001, dtype=torch.int64).to(torch.uint8)
    w = Windows(data, seq_len=10, seed=3)
    assert w.count == 100
    one_go = w.batch(95, 10)  # crosses into the second epoch
    fresh = Windows(data, seq_len=10, seed=3)  # a resumed run: only the position carries over
    assert torch.equal(torch.cat([fresh.batch(95, 4), fresh.batch(99, 6)]), one_go)
    starts = w.starts(0, 100)
    assert sorted(starts.tolist()) == list(range(0, 1000, 10))  # each window once per epoch
    assert not torch.equal(w.starts(100, 100), starts)  # and a new order in the next
    assert one_go.shape == (10, 11) and torch.equal(one_go[:, 1:], (one_go[:, :-1] + 1) % 256)
    assert torch.equal(validation_batch(data, 10, 2, 1)[0], torch.arange(20, 31) % 256)


def test_warmup_cosine():
    s = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    assert WarmupCosine(0, 5, 0.0)(0) == 1.0 and math.isclose(WarmupCosine(0, 5, 0.0)(5), 0.0, abs_tol=1e-12)


def test_chunk_bounds_are_torch_chunk():
    for n in range(23):
        for parts in range(1, 6):
            pieces = torch.arange(n).chunk(parts) if n else ()
            for i in range(parts):
                s, e = chunk_bounds(n, parts, i)
                got = list(range(s, e))
                assert got == (pieces[i].tolist() if i < len(pieces) else []), (n, parts, i)


def test_param_blocks_single_process():
    from tp_ffn.models import PRESETS, Transformer

    m = Transformer(PRESETS["tiny"])
    blocks = param_blocks(m)
    assert set(blocks) == {n for n, _ in m.named_parameters()}
    assert all(b.is_full and not any(b.offsets) for b in blocks.values())
    assert blocks["layers.0.feed_forward.w2.weight"].tp_sharded and not blocks["norm.weight"].tp_sharded


def test_metrics_log_trims_on_resume_and_plots(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in range(1, 8):
        log.write({"step": step, "loss": 5.0 - step * 0.1, "lr": 1e-3, "tokens_per_s": 100.0})
        if step % 3 == 0:
            log.write({"step": step, "val_loss": 5.0 - step * 0.1})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # a crash mid-line
    log = MetricsLog(path, resume_step=4)
    log.write({"step": 5, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0})
    log.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5] and rows[-1]["loss"] == 1.0
    assert all(json.loads(line) for line in path.read_text().splitlines())
    png = plot_metrics(path)
    assert png == tmp_path / "m.png" and png.read_bytes()[:4] == b"\x89PNG"
    MetricsLog(path).close()  # a fresh run starts the file afresh
    assert path.read_text() == ""
