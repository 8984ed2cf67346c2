"""Checkpoints: resume continues the run exactly, also at another TP / dp size (resharding, with an
uneven hidden size); a crash mid-save leaves the previous checkpoint as the newest; damaged or
foreign checkpoints are refused with a clear error and nothing on disk changes.

Resharding is checked by its consequence: the run that resumes from step 10 at another layout
gives the losses of steps 11..20, and the weights at step 20, of the uninterrupted run, to 1e-4
relative (the layouts differ in summation order only; a lost or misplaced block would be off by
O(1)). At the same layout the continuation is bit-for-bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from support.rankpool import run_ranks

from tp_ffn.train import TrainConfig, train
from tp_ffn.train.checkpoint import store as ck

# hidden 341 (multiple_of 1): 171/170 over TP 2, 86/85/85/85 over TP 4 (torch.chunk would say
# 86/86/86/83), and torch.chunk pieces of those over FSDP. 4 kv heads: TP up to 4.
BASE = dict(
    preset="tiny", model_args={"multiple_of": 1, "n_kv_heads": 4}, steps=20, ckpt_every=10, seq_len=32,
    batch_size=8, corpus_bytes=200_000, val_every=10, val_sequences=8, warmup_steps=5, seed=0, progress=False,
)  # fmt: skip


def _train(rank: int, world: int, overrides: dict) -> dict:
    res = train(TrainConfig(**{**BASE, **overrides}))
    return {"losses": res.losses, "start": res.start_step, "resumed_from": res.resumed_from}


def _run(world: int, **overrides) -> dict:
    return run_ranks(world, _train, overrides, timeout=240)[0]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _weights_rel(a: Path, b: Path) -> float:
    wa, wb = ck.load_full_tensors(a), ck.load_full_tensors(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    return max(((wa[k] - wb[k]).norm() / wb[k].norm()).item() for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 20-step runs at each saving layout, keyed by (world, tp, dp)."""
    cache: dict = {}

    def get(world: int, tp: int, dp: int) -> tuple[dict, Path]:
        if (world, tp, dp) not in cache:
            d = tmp_path_factory.mktemp(f"ref_w{world}_tp{tp}_dp{dp}")
            cache[(world, tp, dp)] = (_run(world, tp=tp, dp=dp, ckpt_dir=str(d)), d)
        return cache[(world, tp, dp)]

    return get


def _resume_from_step10(ref_dir: Path, tmp_path: Path, world: int, tp: int, dp: int) -> tuple[dict, Path]:
    d = tmp_path / f"resume_w{world}_tp{tp}_dp{dp}"
    d.mkdir()
    shutil.copytree(ref_dir / "step_00000010", d / "step_00000010")
    return _run(world, tp=tp, dp=dp, ckpt_dir=str(d), resume=True), d


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_same_layout_is_bit_exact(reference, tmp_path):
    ref, ref_dir = reference(2, 2, 1)
    got, d = _resume_from_step10(ref_dir, tmp_path, 2, 2, 1)
    assert got["start"] == 10 and got["resumed_from"].endswith("step_00000010")
    assert got["losses"] == ref["losses"][10:]
    assert _weights_rel(d / "step_00000020", ref_dir / "step_00000020") == 0.0
    # The metrics file of the resumed run starts where the checkpoint was: no duplicate steps.
    steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 11 and steps[-1] == 20


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "saved, loaded",
    [((2, 2, 1), (1, 1, 1)), ((1, 1, 1), (2, 2, 1)), ((4, 2, 2), (4, 4, 1)), ((4, 4, 1), (2, 1, 2))],
    ids=["tp2-to-tp1", "tp1-to-tp2", "tp2dp2-to-tp4", "tp4-to-tp1dp2"],
)
def test_resume_reshards(reference, tmp_path, saved, loaded):
    ref, ref_dir = reference(*saved)
    got, d = _resume_from_step10(ref_dir, tmp_path, *loaded)
    assert got["start"] == 10
    assert _max_rel(got["losses"], ref["losses"][10:]) < 1e-4
    assert _weights_rel(d / "step_00000020", ref_dir / "step_00000020") < 1e-4
    meta = json.loads((d / "step_00000020" / "meta.json").read_text())
    assert (meta["tp"], meta["dp"], meta["world"]) == (loaded[1], loaded[2], loaded[0])


def _crash_in_second_save(rank: int, world: int, overrides: dict) -> None:
    """Run with DCP's final step (rank 0 writing .metadata) failing at the second save."""
    import torch.distributed.checkpoint as dcp

    real = dcp.FileSystemWriter.finish
    calls = {"n": 0}

    def finish(self, metadata, results):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while saving")
        return real(self, metadata, results)

    dcp.FileSystemWriter.finish = finish
    try:
        train(TrainConfig(**{**BASE, **overrides}))
    finally:
        dcp.FileSystemWriter.finish = real


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crash_mid_save_keeps_previous_checkpoint(reference, tmp_path):
    ref, _ = reference(2, 2, 1)
    d = tmp_path / "crash"
    with pytest.raises(AssertionError, match="simulated crash while saving"):
        run_ranks(2, _crash_in_second_save, {"tp": 2, "ckpt_dir": str(d)}, timeout=240)
    names = sorted(p.name for p in d.iterdir())
    # The failed save removed its partial directory (tp_ffn/train/checkpoint/saving.py); step 10 is the newest.
    assert names == ["metrics.jsonl", "step_00000010"], names
    # A save cut short by the death of a process leaves its directory instead: resume removes it.
    shutil.copytree(d / "step_00000010", d / ".tmp-step_00000020-deadbeef")
    before = _snapshot(d / "step_00000010")
    info, _ = ck.find_latest(d)
    assert info is not None and info.step == 10
    ck.verify_files(info)
    # Resume: the leftover is removed, step 10 is read (not modified) and the run ends as if uninterrupted.
    got = _run(2, tp=2, ckpt_dir=str(d), resume=True)
    assert got["resumed_from"].endswith("step_00000010")
    assert got["losses"] == ref["losses"][10:]
    assert _snapshot(d / "step_00000010") == before
    assert not any(p.name.startswith(".tmp-") for p in d.iterdir())


def test_find_latest_skips_incomplete_and_refuses_foreign(tmp_path):
    (tmp_path / "step_00000030").mkdir()  # no meta.json: never one of ours, skipped
    assert ck.find_latest(tmp_path) == (None, [tmp_path / "step_00000030"])
    (tmp_path / "step_00000020").mkdir()
    (tmp_path / "step_00000020" / "meta.json").write_text(json.dumps({"format": "someone-else/3", "step": 20}))
    with pytest.raises(ck.UsageError, match="is not a tp_ffn training checkpoint"):
        ck.find_latest(tmp_path)
    (tmp_path / "step_00000020" / "meta.json").write_text("{not json")
    with pytest.raises(ck.UsageError, match="is damaged: meta.json cannot be read"):
        ck.find_latest(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(ck.UsageError, match="holds a Hugging Face model"):
        ck.check_ckpt_dir(hf)


def _expect_error(rank: int, world: int, overrides: dict) -> str | None:
    try:
        train(TrainConfig(**{**BASE, **overrides}))
    except ck.UsageError as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_or_mismatched_checkpoints_are_refused(reference, tmp_path):
    _, ref_dir = reference(2, 2, 1)
    cases = {
        "truncated": (
            lambda d: _truncate(d / "step_00000010" / "__1_0.distcp"),
            {},
            r"is damaged: __1_0.distcp is \d+ bytes, expected \d+",
        ),
        "garbled": (lambda d: _garble(d / "step_00000010" / ".metadata"), {}, r"is damaged: .metadata does not match its digest"),
        "foreign": (lambda d: _foreign(d / "step_00000010" / "meta.json"), {}, r"is not a tp_ffn training checkpoint"),
        "other-model": (
            lambda d: None,
            {"model_args": {**BASE["model_args"], "n_layers": 3}},
            r"is for another model \(n_layers 2 vs 3\)",
        ),
        "other-data": (lambda d: None, {"corpus_bytes": 150_000}, r"was trained on other data"),
        "fresh-run": (lambda d: None, {"resume": False}, r"already holds checkpoints .*pass --resume"),
    }
    for name, (damage, overrides, pattern) in cases.items():
        d = tmp_path / name
        d.mkdir()
        shutil.copytree(ref_dir / "step_00000010", d / "step_00000010")
        damage(d)
        before = _snapshot(d)
        errors = run_ranks(1, _expect_error, {"tp": 1, "ckpt_dir": str(d), "resume": True, **overrides})
        assert errors[0] is not None, name
        assert re.search(pattern, errors[0]), (name, errors[0])
        assert _snapshot(d) == before, f"{name}: the checkpoint directory changed"


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garble(f: Path) -> None:
    f.write_bytes(bytes(len(f.read_bytes())))


def _foreign(f: Path) -> None:
    meta = json.loads(f.read_text())
    meta["format"] = "megatron/dist-ckpt"
    f.write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_full_tensors_has_global_shapes(reference):
    _, ref_dir = reference(2, 2, 1)
    w = ck.load_full_tensors(ref_dir / "step_00000010")
    assert w["layers.0.feed_forward.w1.weight"].shape == (341, 128)
    assert w["layers.0.feed_forward.w2.weight"].shape == (128, 341)
    assert w["output.weight"].shape == (256, 128)
    assert all(torch.isfinite(t).all() for t in w.values())


def _first_loss(rank: int, world: int, overrides: dict) -> float:
    return train(TrainConfig(**{**BASE, **overrides})).losses[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_init_from_pretrained_weights(tmp_path, fmt):
    """--init-from a Hugging Face / Meta (2 shards) directory at TP=2: the first step's loss is the
    loss of the exported model on the first batch, computed here in one process."""
    import torch.nn.functional as F

    from tp_ffn.models import PRESETS, Transformer
    from tp_ffn.models.weights import export_hf, export_meta
    from tp_ffn.train.data.corpus import Windows, load_corpus

    torch.manual_seed(123)  # not the training seed: the weights must come from the files
    model = Transformer(PRESETS["tiny"])
    src = tmp_path / fmt
    export_hf(model, src) if fmt == "hf" else export_meta(model, src, num_shards=2)
    corpus = load_corpus(None, corpus_bytes=BASE["corpus_bytes"], val_fraction=0.05, seq_len=BASE["seq_len"])
    batch = Windows(corpus.train, BASE["seq_len"], BASE["seed"]).batch(0, BASE["batch_size"])
    with torch.no_grad():
        want = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    got = run_ranks(
        2,
        _first_loss,
        # the exported directory has no tokenizer: train the pretrained weights on byte ids
        {"tp": 2, "steps": 1, "ckpt_every": 0, "model_args": {}, "init_from": str(src), "tokenizer": "bytes"},
        timeout=240,
    )[0]
    assert abs(got - want) / want < 1e-5
    torch.manual_seed(BASE["seed"])  # what the run would start from without --init-from
    with torch.no_grad():
        fresh = F.cross_entropy(
            Transformer(PRESETS["tiny"])(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
        ).item()
    assert abs(fresh - want) / want > 1e-3


def _load_on_a_one_rank_group(rank: int, world: int, path: str) -> tuple[float, dict] | None:
    import time

    import torch.distributed as dist

    from tp_ffn.train.run.generate import load_checkpoint_model

    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    if rank != 0:
        return None  # rank 1 never loads: a collective over the world would wait for it
    t0 = time.monotonic()
    model, _ = load_checkpoint_model(path, group=groups[0])
    return time.monotonic() - t0, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(120)
def test_load_checkpoint_model_waits_only_on_its_group(tmp_path):
    """A one-rank group on rank 0 of a 2-rank world: DCP's load ran over the default group and
    blocked until the group timeout (60 s in the rank pool)."""
    import dataclasses

    from tp_ffn.models import PRESETS, Transformer

    cfg = PRESETS["tiny"]
    torch.manual_seed(1)
    model = Transformer(cfg)
    ck.TrainingState(model).save(tmp_path, 1, 0, {"model": dataclasses.asdict(cfg)})
    seconds, state = run_ranks(2, _load_on_a_one_rank_group, str(tmp_path), timeout=45)[0]
    assert seconds < 20
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
