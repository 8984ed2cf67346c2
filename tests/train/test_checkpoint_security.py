"""Training checkpoints from elsewhere run no code, and damaged ones are refused before they are used.

Every hostile or damaged checkpoint below is the newest of a ``--ckpt-dir`` that also holds an older,
intact one, and is tried through every path that reads a training checkpoint: the Python APIs
``load_checkpoint_model`` and ``load_full_tensors``, and ``scripts/sample.py`` and
``scripts/train.py --resume`` (their ``main``, in a one-rank process group; two cases also as real
processes, under ``python`` and under ``torchrun`` with two ranks). Each must end in one line naming
the cause (exit status 2 from the scripts), the file the payload would create must not exist, and
the whole ``--ckpt-dir`` must be byte-for-byte as before.

Negative controls, so that no assertion passes vacuously: every payload does run its code when read
the way DCP reads it by default (plain pickle / ``torch.load(weights_only=False)``); the intact
checkpoint passes through every path; the same-size overwrite loads silently once digests are
skipped; the restricted unpickler, when it is made to allow every global, runs the payload; and the
ranks disagree when the verdict is not gathered.
"""

from __future__ import annotations

import ast
import enum
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import pickle_forms
from support.rankpool import run_ranks
from support.scriptmain import ROOT, script_error
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from tp_ffn.train import TrainConfig, UsageError, train
from tp_ffn.train.checkpoint import safe_dcp
from tp_ffn.train.checkpoint import store as ck
from tp_ffn.train.run.generate import load_checkpoint_model

TRAIN = dict(
    preset="tiny", model_args={"n_layers": 1}, seq_len=16, batch_size=2, corpus_bytes=20_000, val_every=0,
    val_sequences=2, warmup_steps=1, seed=0, progress=False, steps=2, ckpt_every=1,
)  # fmt: skip
TRAIN_ARGV = [
    "--preset", "tiny", "--model-args", "n_layers=1", "--seq-len", "16", "--batch-size", "2", "--corpus-bytes",
    "20000", "--val-every", "0", "--val-sequences", "2", "--warmup-steps", "1", "--seed", "0", "--no-progress",
    "--steps", "3", "--resume",
]  # fmt: skip
NEWEST = "step_00000002"


class Payload:
    """Unpickles into ``os.system("touch MARKER")``: the marker's existence says the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train_run(rank: int, world: int, overrides: dict) -> None:
    train(TrainConfig(**{**TRAIN, **overrides}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A ``--ckpt-dir`` written by scripts/train.py's code: step_00000001 and step_00000002."""
    d = tmp_path_factory.mktemp("pristine")
    run_ranks(1, _train_run, {"ckpt_dir": str(d)}, timeout=240)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("step_")) == ["step_00000001", NEWEST]
    return d


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rewrite_meta(step: Path) -> None:
    """meta.json's sizes and digests made to match the files, as an attacker would."""
    meta = json.loads((step / "meta.json").read_text())
    meta["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(step.iterdir())
        if p.name != "meta.json"
    }
    (step / "meta.json").write_text(json.dumps(meta))


def _trusted_index(step: Path) -> Metadata:
    """The index of a checkpoint this test wrote itself (so plain pickle is fine here)."""
    with open(step / ".metadata", "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------------------------------
# The hostile and damaged checkpoints: each builder changes the newest checkpoint of a copy


def _metadata_code(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _rewrite_meta(step)


def _bytes_entry_code(step: Path, marker: Path) -> None:
    """Written with DCP itself: the same state, except that train.step is an arbitrary Python object."""
    md = _trusted_index(step)
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(step)), no_dist=True)
    sd["train.step"] = Payload(marker)
    for p in step.iterdir():
        if p.name != "meta.json":
            p.unlink()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(step)), no_dist=True)
    _rewrite_meta(step)


def _tensor_record_code(step: Path, marker: Path) -> None:
    """A clean index whose record of model.norm.weight is a torch.save of the payload, in a new file."""
    md = _trusted_index(step)
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    (step / "__0_1.distcp").write_bytes(blob.getvalue())
    md.storage_data[MetadataIndex("model.norm.weight", (0,))] = _StorageInfo("__0_1.distcp", 0, len(blob.getvalue()))
    with open(step / ".metadata", "wb") as f:
        pickle.dump(md, f)
    _rewrite_meta(step)


def _overwrite_same_size(step: Path, marker: Path) -> None:
    """The lowest bit of 16 floats in the middle of the embedding's record flipped: a silent bit rot."""
    rec = _trusted_index(step).storage_data[MetadataIndex("model.tok_embeddings.weight", (0, 0))]
    f = step / rec.relative_path
    data = bytearray(f.read_bytes())
    pos = rec.offset + (rec.length // 2) // 64 * 64  # torch.save aligns tensor data to 64 bytes
    for i in range(16):
        data[pos + 4 * i] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(step: Path, marker: Path) -> None:
    f = step / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:1000])


def _delete(step: Path, marker: Path) -> None:
    (step / "__0_0.distcp").unlink()


def _meta_not_json(step: Path, marker: Path) -> None:
    (step / "meta.json").write_text('{"format": "tp_ffn.train.checkpoint/1", "step": 2, ')


def _meta_names_absent_file(step: Path, marker: Path) -> None:
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["__1_0.distcp"] = {"size": 10, "sha256": "0" * 64}
    (step / "meta.json").write_text(json.dumps(meta))


def _meta_names_outside_file(step: Path, marker: Path) -> None:
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["../step_00000001/__0_0.distcp"] = meta["files"]["__0_0.distcp"]
    (step / "meta.json").write_text(json.dumps(meta))


def _meta_lies_about_model(step: Path, marker: Path) -> None:
    """Two layers in meta.json (the command line below agrees), one layer in the tensors."""
    meta = json.loads((step / "meta.json").read_text())
    meta["model"]["n_layers"] = 2
    (step / "meta.json").write_text(json.dumps(meta))


def _meta_absurd_model(step: Path, marker: Path) -> None:
    meta = json.loads((step / "meta.json").read_text())
    meta["model"]["dim"] = 10**12
    meta["model"]["n_heads"] = 4
    (step / "meta.json").write_text(json.dumps(meta))


def _index_points_outside(step: Path, marker: Path) -> None:
    md = _trusted_index(step)
    for index, rec in list(md.storage_data.items()):
        md.storage_data[index] = _StorageInfo(f"../step_00000001/{rec.relative_path}", rec.offset, rec.length)
    with open(step / ".metadata", "wb") as f:
        pickle.dump(md, f)
    _rewrite_meta(step)


# A pickle written opcode by opcode (protocol 4): the forms no Pickler of an ordinary object writes.
def _p_str(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def _p_global(module: str, name: str) -> bytes:
    return _p_str(module) + _p_str(name) + pickle.STACK_GLOBAL


def _p_call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _pickle_of(expr: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + expr + pickle.STOP


GETATTR = _p_global("builtins", "getattr")
MEM_FORMAT = _p_global("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")


def _getattr_chain_to_system(command: str) -> bytes:
    """``getattr(_MEM_FORMAT_ENCODING, "__init__").__globals__`` -> ``sys`` -> ``os.system(command)``:
    only ``getattr`` and an allowed enum class, the gadget an unpickler that allows ``getattr`` meets."""
    globals_ = _p_call(GETATTR, _p_call(GETATTR, MEM_FORMAT, _p_str("__init__")), _p_str("__globals__"))
    sys_module = _p_call(_p_call(GETATTR, globals_, _p_str("get")), _p_str("sys"))
    os_module = _p_call(_p_call(GETATTR, _p_call(GETATTR, sys_module, _p_str("modules")), _p_str("get")), _p_str("os"))
    return _pickle_of(_p_call(_p_call(GETATTR, os_module, _p_str("system")), _p_str(command)))


def _metadata_getattr_chain(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(_getattr_chain_to_system(f"touch {marker}"))
    _rewrite_meta(step)


# (builder, pattern of the one-line message, the --model-args train.py --resume runs with)
CASES: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "metadata-getattr-chain": (_metadata_getattr_chain, r"\.metadata was refused as unsafe \(it calls builtins\.getattr for '__init__', which is not a member of _MEM_FORMAT_ENCODING\); nothing in it ran$", "n_layers=1"),
    "metadata-code": (_metadata_code, r"\.metadata was refused as unsafe \(it asks for posix\.system.*\); nothing in it ran", "n_layers=1"),
    "bytes-entry-code": (_bytes_entry_code, r"\.metadata was refused as unsafe \(entry 'train\.step' is stored as pickled bytes.*nothing in it ran", "n_layers=1"),
    "tensor-record-code": (_tensor_record_code, r"__0_1\.distcp was refused as unsafe \(a tensor record asks for more than tensor data.*nothing in it ran", "n_layers=1"),
    "same-size-overwrite": (_overwrite_same_size, r"is damaged: __0_0\.distcp does not match its digest$", "n_layers=1"),
    "truncated": (_truncate, r"is damaged: __0_0\.distcp is 1000 bytes, expected \d+ bytes$", "n_layers=1"),
    "missing": (_delete, r"is damaged: __0_0\.distcp is missing, expected \d+ bytes$", "n_layers=1"),
    "meta-not-json": (_meta_not_json, r"is damaged: meta\.json cannot be read \(JSONDecodeError", "n_layers=1"),
    "meta-names-absent-file": (_meta_names_absent_file, r"is damaged: __1_0\.distcp is missing, expected 10 bytes$", "n_layers=1"),
    "meta-names-outside-file": (_meta_names_outside_file, r"is damaged: meta\.json lists '\.\./step_00000001/__0_0\.distcp', which is not a file name inside the checkpoint$", "n_layers=1"),
    "meta-lies-about-model": (_meta_lies_about_model, r"is damaged: meta\.json's model config describes [\d,]+ parameters .* but the stored weights hold [\d,]+ elements", "n_layers=2"),
    "meta-absurd-model": (_meta_absurd_model, r"is damaged: meta\.json's model config describes [\d,]+ parameters \(dim 1000000000000, .*refusing to build it$", "n_layers=1,dim=1000000000000,n_heads=4"),
    "index-points-outside": (_index_points_outside, r"\.metadata was refused as unsafe \(a record points outside the checkpoint directory", "n_layers=1"),
}  # fmt: skip


def _hostile_copy(pristine: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    d = tmp_path / case
    shutil.copytree(pristine, d)
    marker = tmp_path / f"marker-{case}"
    CASES[case][0](d / NEWEST, marker)
    return d, marker


# --------------------------------------------------------------------------------------------------
# The four read paths, each returning the one-line error (None: it loaded)


def _api_model(d: Path) -> str | None:
    try:
        load_checkpoint_model(d)
    except UsageError as e:
        return str(e)
    return None


def _api_tensors(d: Path) -> str | None:
    try:
        ck.load_full_tensors(d / NEWEST)
    except UsageError as e:
        return str(e)
    return None


def _sample(d: Path) -> str | None:
    return script_error("sample.py", ["--ckpt-dir", str(d), "--max-new-tokens", "2"])


def _resume(d: Path, model_args: str = "n_layers=1") -> str | None:
    argv = [*TRAIN_ARGV, "--ckpt-dir", str(d)]
    argv[argv.index("n_layers=1")] = model_args
    return script_error("train.py", argv)


def _convert(d: Path) -> str | None:
    out = d.parent / f"{d.name}-as-hf"
    error = script_error("convert_checkpoint.py", ["--from", "train", "--to", "hf", str(d), str(out)])
    assert (error is None) == out.exists(), "a refused conversion wrote its destination"
    return error


PATHS = {
    "load_checkpoint_model": _api_model, "load_full_tensors": _api_tensors, "sample.py": _sample,
    "convert_checkpoint.py --from train": _convert,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint_is_refused_everywhere(pristine, tmp_path, case):
    d, marker = _hostile_copy(pristine, tmp_path, case)
    _, pattern, model_args = CASES[case]
    before = _snapshot(d)
    paths: dict[str, Callable[[Path], str | None]] = {**PATHS, "train.py --resume": lambda p: _resume(p, model_args)}
    for name, read in paths.items():
        error = read(d)
        assert error is not None, f"{case}: {name} loaded it"
        assert "\n" not in error and re.search(pattern, error), (case, name, error)
        assert str(d / NEWEST) in error, (case, name, error)  # names the checkpoint
        assert not marker.exists(), f"{case}: {name} ran the payload"
        assert _snapshot(d) == before, f"{case}: {name} changed the --ckpt-dir"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_negative_control_intact_checkpoint_passes_every_path(pristine, tmp_path):
    """The same paths and assertions let the intact checkpoint through: a refusal above is about the damage."""
    d = tmp_path / "intact"
    shutil.copytree(pristine, d)
    for name, read in PATHS.items():
        assert read(d) is None, name
    assert _resume(d) is None  # continues to step 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["metadata-code", "metadata-getattr-chain", "bytes-entry-code", "tensor-record-code"])
def test_negative_control_payloads_run_when_read_as_dcp_does_by_default(pristine, tmp_path, case):
    d, marker = _hostile_copy(pristine, tmp_path, case)
    step = d / NEWEST
    if case.startswith("metadata-"):
        with open(step / ".metadata", "rb") as f:
            pickle.load(f)  # FileSystemReader.read_metadata
    elif case == "bytes-entry-code":
        # What a resume asks DCP for; its default planner unpickles the bytes entry.
        sd = {"train.step": torch.zeros((), dtype=torch.int64)}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(step)), no_dist=True)
    else:
        torch.load(step / "__0_1.distcp", weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_negative_control_unrestricted_unpickler_runs_the_payload(pristine, tmp_path, monkeypatch):
    """With the allow-list switched off, load_full_tensors runs the .metadata payload: the allow-list is what stops it."""
    d, marker = _hostile_copy(pristine, tmp_path, "metadata-code")
    monkeypatch.setattr(safe_dcp._IndexUnpickler, "find_class", pickle._Unpickler.find_class)
    with pytest.raises(UsageError):
        ck.load_full_tensors(d / NEWEST)
    assert marker.exists()


@pytest.mark.slow
def test_negative_control_same_size_damage_loads_silently_without_digests(pristine, tmp_path):
    d, _ = _hostile_copy(pristine, tmp_path, "same-size-overwrite")
    damaged = ck.load_full_tensors(d / NEWEST, verify=False)
    intact = ck.load_full_tensors(pristine / NEWEST)
    assert any(not torch.equal(damaged[k], intact[k]) for k in intact)
    assert load_checkpoint_model(d, verify=False)[1].step == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_verify_checkpoint_flag_skips_only_the_digests(pristine, tmp_path):
    d, _ = _hostile_copy(pristine, tmp_path, "same-size-overwrite")
    assert _sample(d) is not None
    assert script_error("sample.py", ["--ckpt-dir", str(d), "--max-new-tokens", "2", "--no-verify-checkpoint"]) is None
    h, marker = _hostile_copy(pristine, tmp_path, "metadata-code")
    error = script_error("sample.py", ["--ckpt-dir", str(h), "--no-verify-checkpoint"])
    assert error is not None and "refused as unsafe" in error and not marker.exists()
    argv = [*TRAIN_ARGV, "--ckpt-dir", str(d), "--no-verify-checkpoint"]
    assert script_error("train.py", argv) is None
    # Conversion: the same flag; and verify_checkpoint takes a path as well as open_checkpoint's info.
    # (A fresh damaged copy: the resumed run above wrote a newer, intact checkpoint into d.)
    d, _ = _hostile_copy(pristine, tmp_path / "convert", "same-size-overwrite")
    convert = ["--from", "train", "--to", "hf", str(d)]
    assert "does not match its digest" in script_error("convert_checkpoint.py", [*convert, str(tmp_path / "hf")])
    assert script_error("convert_checkpoint.py", [*convert, str(tmp_path / "hf2"), "--no-verify-checkpoint"]) is None
    with pytest.raises(ck.DamagedCheckpointError, match="does not match its digest"):
        ck.verify_checkpoint(d)
    ck.verify_checkpoint(d, digests=False)


# --------------------------------------------------------------------------------------------------
# Real processes: exit status and the one line, nothing else on stderr


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sample_script_process_refuses_metadata_code(pristine, tmp_path):
    d, marker = _hostile_copy(pristine, tmp_path, "metadata-code")
    before = _snapshot(d)
    r = subprocess.run(
        [sys.executable, "scripts/sample.py", "--ckpt-dir", str(d)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=200, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: checkpoint "), r.stderr
    assert "refused as unsafe" in lines[0] and "nothing in it ran" in lines[0]
    assert r.stdout == "" and not marker.exists() and _snapshot(d) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_resume_under_torchrun_refuses_with_one_line(pristine, tmp_path):
    """Two ranks (rank 0 digests the only data file, rank 1 none): one error line, exit status 2, the
    directory unchanged. That both ranks reach the verdict is held in
    test_ranks_share_the_digests_and_agree_on_the_verdict: here torchrun stops the other worker as
    soon as one exits, so which exit codes it reports depends on which rank is faster."""
    d, _ = _hostile_copy(pristine, tmp_path, "same-size-overwrite")
    before = _snapshot(d)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py"]
    argv = [*TRAIN_ARGV, "--ckpt-dir", str(d), "--tp", "2", "--timeout", "60"]
    r = subprocess.run(cmd + argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 1, r.stdout + r.stderr
    assert lines[0].endswith("is damaged: __0_0.distcp does not match its digest"), lines[0]
    assert "exitcode  : 2" in r.stderr, r.stderr  # torchrun's summary of the worker that stopped first
    # No worker printed a traceback (torchrun's own report of the failed group is not ours to silence).
    assert "tp_ffn/" not in r.stderr and 'scripts/train.py", line' not in r.stderr, r.stderr
    assert _snapshot(d) == before


# --------------------------------------------------------------------------------------------------
# Digests on save, legacy checkpoints, and the verdict across ranks


@pytest.mark.slow
def test_meta_json_records_each_files_size_and_digest(pristine):
    meta = json.loads((pristine / NEWEST / "meta.json").read_text())
    files = {p.name for p in (pristine / NEWEST).iterdir() if p.name != "meta.json"}
    assert set(meta["files"]) == files == {".metadata", "__0_0.distcp"}
    for name, entry in meta["files"].items():
        data = (pristine / NEWEST / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.slow
def test_checkpoint_without_digests_loads_with_a_one_line_notice(pristine, tmp_path, capsys):
    d = tmp_path / "legacy"
    shutil.copytree(pristine, d)
    meta_path = d / NEWEST / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {name: entry["size"] for name, entry in meta["files"].items()}  # as written before digests
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    ck.load_full_tensors(d / NEWEST)
    load_checkpoint_model(d)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 2 and all(ln.startswith(f"notice: checkpoint {d / NEWEST} has no digests") for ln in err), err
    # Negative control: a checkpoint with digests prints nothing.
    ck.load_full_tensors(pristine / NEWEST)
    assert capsys.readouterr().err == ""
    # Sizes are still checked without digests.
    (d / NEWEST / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ck.DamagedCheckpointError, match=r"__0_0\.distcp is 1 bytes"):
        ck.load_full_tensors(d / NEWEST)


def _save_tp2(rank: int, world: int, root: str) -> list[str]:
    """A model-only checkpoint written by two TP ranks (files __0_0 and __1_0, digested each by its writer)."""
    import dataclasses

    import torch.distributed as dist

    from tp_ffn.models.llama import LlamaConfig, Transformer

    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg, group=dist.group.WORLD)
    path = ck.TrainingState(model).save(root, 1, 0, {"model": dataclasses.asdict(cfg)})
    return sorted(p.name for p in path.iterdir())


def _verify_on_ranks(rank: int, world: int, path: str, gathered: bool) -> str | None:
    """verify_checkpoint over the world (gathered), or this rank's share of it alone."""
    import torch.distributed as dist

    info = ck.open_checkpoint(path)
    try:
        if gathered:
            ck.verify_checkpoint(info, group=dist.group.WORLD)
        else:
            ck._verify_here(info, True, rank, world)
    except UsageError as e:
        return str(e)
    return None


@pytest.mark.timeout(300)
def test_ranks_share_the_digests_and_agree_on_the_verdict(tmp_path):
    names = run_ranks(2, _save_tp2, str(tmp_path / "ck"), timeout=120)[0]
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    step = tmp_path / "ck" / "step_00000001"
    assert run_ranks(2, _verify_on_ranks, str(step), True, timeout=120) == [None, None]
    # Damage the file only rank 1 digests: both ranks report it.
    f = step / "__1_0.distcp"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    want = f"checkpoint {step} is damaged: __1_0.distcp does not match its digest"
    assert run_ranks(2, _verify_on_ranks, str(step), True, timeout=120) == [want, want]
    # Negative control: each rank's share alone; rank 0 would go on with a damaged checkpoint.
    assert run_ranks(2, _verify_on_ranks, str(step), False, timeout=120) == [None, want]


# --------------------------------------------------------------------------------------------------
# The restricted unpickler itself


@pytest.mark.slow
def test_every_global_of_a_real_index_is_allowed(pristine):
    """A checkpoint written by the installed torch: its .metadata uses only allowed globals, and loads."""
    seen: set[tuple[str, str]] = set()

    class Spy(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(pristine / NEWEST / ".metadata", "rb") as f:
        Spy(f).load()
    assert seen and seen <= set(safe_dcp.ALLOWED_GLOBALS), seen - set(safe_dcp.ALLOWED_GLOBALS)
    md = safe_dcp.read_index(pristine / NEWEST)
    assert md.state_dict_metadata.keys() == _trusted_index(pristine / NEWEST).state_dict_metadata.keys()


@pytest.mark.parametrize(
    "global_name",
    [
        "builtins eval",
        "os system",
        "torch load",
        "torch.distributed.checkpoint.filesystem FileSystemReader",
        "builtins setattr",
        "__builtin__ getattr",  # refused at protocol 4: only protocols 0-2 use Python 2's module names
    ],
)
def test_globals_outside_the_index_are_refused(tmp_path, global_name):
    module, name = global_name.split()
    (tmp_path / ".metadata").write_bytes(b"\x80\x04c" + f"{module}\n{name}\n".encode() + b"N\x85R.")
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match=rf"it asks for {re.escape(module)}\.{name}"):
        safe_dcp.read_index(tmp_path)


def test_state_is_set_only_on_dcp_metadata_instances(tmp_path):
    """BUILD on the class Metadata itself would rewrite a class attribute: refused (the C unpickler does it)."""
    blob = b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\nN}\x8c\x0bpwned_by_it\x88s\x86b."
    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="sets the state of a type"):
        safe_dcp.read_index(tmp_path)
    assert not hasattr(Metadata, "pwned_by_it")
    # Negative control: Python's C unpickler applies it to the class.
    try:
        pickle.loads(blob)
        assert Metadata.pwned_by_it is True
    finally:
        if hasattr(Metadata, "pwned_by_it"):
            delattr(Metadata, "pwned_by_it")


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda md: _set_record(md, transform_descriptors=["zstd"]), r"refused as unsafe \(a record asks for stream transforms"),
        (lambda md: _set_record(md, length=10**12), r"is damaged: \.metadata puts a record of .* past the end of __0_0\.distcp"),
        (lambda md: _set_record(md, offset=0), r"is damaged: \.metadata has overlapping records in __0_0\.distcp"),
        (lambda md: _set_size(md, (10**6, 128)), r"is damaged: .*chunk of 'model\.tok_embeddings\.weight' outside its shape|hold \d+ elements"),
        (lambda md: _set_chunk_sizes(md, (10**6, 128)), r"is damaged: \.metadata has a chunk of 'model\.tok_embeddings\.weight' outside its shape"),
    ],
    ids=["transforms", "past-the-end", "overlap", "shape-not-covered", "chunk-outside"],
)  # fmt: skip
def test_index_inconsistencies_are_refused(pristine, tmp_path, mutate, pattern):
    d = tmp_path / "ck"
    shutil.copytree(pristine / NEWEST, d / NEWEST)
    md = _trusted_index(d / NEWEST)
    mutate(md)
    with open(d / NEWEST / ".metadata", "wb") as f:
        pickle.dump(md, f)
    _rewrite_meta(d / NEWEST)
    with pytest.raises(UsageError, match=pattern):
        ck.load_full_tensors(d / NEWEST)
    # Negative control: the untouched index passes the same call.
    assert ck.load_full_tensors(pristine / NEWEST)


def _set_record(md: Metadata, **changes) -> None:
    """Change the last record of __0_0.distcp (by offset)."""
    index, rec = max(
        ((i, r) for i, r in md.storage_data.items() if r.relative_path == "__0_0.distcp"), key=lambda ir: ir[1].offset
    )
    fields = {"relative_path": rec.relative_path, "offset": rec.offset, "length": rec.length}
    md.storage_data[index] = _StorageInfo(**{**fields, **changes})


def _set_size(md: Metadata, size: tuple[int, ...]) -> None:
    md.state_dict_metadata["model.tok_embeddings.weight"].size = torch.Size(size)


def _set_chunk_sizes(md: Metadata, size: tuple[int, ...]) -> None:
    md.state_dict_metadata["model.tok_embeddings.weight"].chunks[0].sizes = torch.Size(size)


@pytest.mark.slow
def test_tensor_records_must_be_stored_zip_archives(pristine, tmp_path):
    """A record that is not a torch.save zip (here: a legacy-format torch.save, which allocates what it
    declares before reading) is refused before torch.load sees it."""
    d = tmp_path / "ck"
    shutil.copytree(pristine / NEWEST, d / NEWEST)
    step = d / NEWEST
    md = _trusted_index(step)
    blob = io.BytesIO()
    torch.save(torch.ones(128), blob, _use_new_zipfile_serialization=False)
    (step / "__0_1.distcp").write_bytes(blob.getvalue())
    md.storage_data[MetadataIndex("model.norm.weight", (0,))] = _StorageInfo("__0_1.distcp", 0, len(blob.getvalue()))
    with open(step / ".metadata", "wb") as f:
        pickle.dump(md, f)
    _rewrite_meta(step)
    with pytest.raises(
        ck.DamagedCheckpointError,
        match=r"__0_1\.distcp: the record of 'model\.norm\.weight': it is not a torch\.save zip",
    ):
        ck.load_full_tensors(step)
    # Negative control: DCP's own reader takes it.
    sd = {"model.norm.weight": torch.zeros(128)}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(step)), no_dist=True)
    assert torch.equal(sd["model.norm.weight"], torch.ones(128))


@pytest.mark.slow
def test_fifo_in_place_of_a_checkpoint_file_is_refused_without_blocking(pristine, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(pristine, d)
    for name in (".metadata", "meta.json"):
        step = d / NEWEST
        saved = (step / name).read_bytes()
        (step / name).unlink()
        os.mkfifo(step / name)
        with pytest.raises(ck.DamagedCheckpointError, match=rf"{re.escape(name)} is not a regular file \(a FIFO\)"):
            ck.load_full_tensors(step)
        (step / name).unlink()
        (step / name).write_bytes(saved)
    assert ck.load_full_tensors(d / NEWEST)  # negative control: restored, it loads


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_digest_smoke(tmp_path):
    """benchmarks/bench_digest.py runs end to end on a tiny model and reports what docs/training.md quotes."""
    out = tmp_path / "digest.json"
    cmd = [
        sys.executable,
        "benchmarks/bench_digest.py",
        "--dim",
        "64",
        "--layers",
        "1",
        "--vocab",
        "256",
        "--repeats",
        "1",
    ]
    cmd += ["--dir", str(tmp_path / "ck"), "--out", str(out), "--algorithms", "sha256,blake2b"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert 0 < result["median"]["digest_s"] < result["median"]["save_s"]
    assert set(result["hash_MBps"]) == {"sha256", "blake2b"} and all(v > 0 for v in result["hash_MBps"].values())
    assert set(result["verify"]) == {"with_digests_s", "without_digests_s"}
    assert not (tmp_path / "ck").exists()  # the scratch checkpoints are removed


@pytest.mark.slow
def test_tensor_records_are_read_weights_only_whatever_the_environment(pristine, tmp_path, monkeypatch):
    d, marker = _hostile_copy(pristine, tmp_path, "tensor-record-code")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ck.UnsafeCheckpointError, match=r"__0_1\.distcp was refused as unsafe"):
        ck.load_full_tensors(d / NEWEST)
    assert not marker.exists()
    # Negative control: with this variable set, a torch.load that leaves weights_only to the default runs it.
    with pytest.warns(UserWarning):
        torch.load(d / NEWEST / "__0_1.distcp")
    assert marker.exists()


def _unsafe_reads(source: str) -> list[str]:
    """Calls in ``source`` that could read a checkpoint around the safe reader: ``dcp.load`` without a
    ``storage_reader``, DCP's ``FileSystemReader``, plain unpickling, ``weights_only=False``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith(("dcp.load", "checkpoint.load")) and "storage_reader" not in keywords:
            found.append(ast.unparse(node))
        if name.endswith("FileSystemReader") and not name.endswith("SafeFileSystemReader"):
            found.append(ast.unparse(node))
        if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") or keywords.get("weights_only") == "False":
            found.append(ast.unparse(node))
    return found


def test_every_checkpoint_read_in_the_code_goes_through_the_safe_reader():
    """A guard for code added later (e.g. a conversion that reads training checkpoints)."""
    files = [p for d in ("tp_ffn", "scripts", "benchmarks") for p in sorted((ROOT / d).rglob("*.py")) if p.name != "safe_dcp.py"]
    assert len(files) > 20
    found = {str(p.relative_to(ROOT)): calls for p in files if (calls := _unsafe_reads(p.read_text()))}
    assert found == {}
    # Negative control: each pattern is caught.
    bad = "dcp.load(sd, checkpoint_id=p)\ndcp.FileSystemReader(p)\npickle.load(f)\ntorch.load(f, weights_only=False)\n"
    assert len(_unsafe_reads(bad)) == 4
    assert _unsafe_reads("dcp.load(sd, storage_reader=ck.checkpoint_reader(info))\nSafeFileSystemReader(p)\n") == []


# --------------------------------------------------------------------------------------------------
# Enum members pickled by name: Python 3.11.0 to 3.11.x (Debian 12's 3.11.2) write getattr(E, "NAME")


class _EnumForm(pickle.Pickler):
    """Pickles every enum member in one form: ``"value"`` (``E(value)``: 3.10, 3.11.7+, 3.12, 3.13) or
    ``"name"`` (``getattr(E, "NAME")``: 3.11.0-3.11.x), whatever the running Python does."""

    def __init__(self, file, protocol: int, form: str) -> None:
        super().__init__(file, protocol)
        self.form = form

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return (getattr, (type(obj), obj.name)) if self.form == "name" else (type(obj), (obj.value,))
        return NotImplemented


def _dumps(obj, protocol: int, form: str) -> bytes:
    out = io.BytesIO()
    _EnumForm(out, protocol, form).dump(obj)
    return out.getvalue()


def _read(blob: bytes):
    return safe_dcp._IndexUnpickler(io.BytesIO(blob)).load()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("form", ["value", "name"])
def test_every_allowed_enum_member_reads_in_both_pickle_forms(protocol, form):
    assert safe_dcp._ENUMS  # TensorProperties' memory format
    for cls in safe_dcp._ENUMS:
        assert (cls.__module__, cls.__qualname__) in safe_dcp.ALLOWED_GLOBALS
        for member in cls:
            blob = _dumps([member, member], protocol, form)  # the second one comes from the memo
            assert (b"getattr" in blob) == (form == "name")
            assert (b"__builtin__" in blob) == (form == "name" and protocol < 3)
            got = _read(blob)
            assert got[0] is member and got[1] is member


@pytest.mark.slow
def test_index_pickled_with_enums_by_name_loads_everywhere(pristine, tmp_path):
    """The newest checkpoint's .metadata as Debian 12's Python 3.11.2 writes it (the same index, its
    memory formats pickled by name) loads through every read path, and resumes."""
    d = tmp_path / "by-name"
    shutil.copytree(pristine, d)
    blob = _dumps(_trusted_index(d / NEWEST), pickle.DEFAULT_PROTOCOL, "name")
    assert b"getattr" in blob
    (d / NEWEST / ".metadata").write_bytes(blob)
    _rewrite_meta(d / NEWEST)
    assert safe_dcp.read_index(d / NEWEST) == _trusted_index(pristine / NEWEST)
    for name, read in PATHS.items():
        assert read(d) is None, name
    assert _resume(d) is None


_E = "torch.distributed.checkpoint.metadata _MEM_FORMAT_ENCODING"


@pytest.mark.parametrize(
    "expr, reason",
    [
        (_p_call(GETATTR, MEM_FORMAT, _p_str("__init__")), "for '__init__', which is not a member of _MEM_FORMAT_ENCODING"),
        (_p_call(GETATTR, MEM_FORMAT, _p_str("_member_map_")), "for '_member_map_', which is not a member"),
        (_p_call(GETATTR, MEM_FORMAT, _p_str("__class__")), "for '__class__', which is not a member"),
        (_p_call(GETATTR, MEM_FORMAT, _p_call(_p_global("torch", "Size"), pickle.EMPTY_TUPLE)), "for torch.Size([]), which is not a member"),
        (_p_call(GETATTR, _p_call(MEM_FORMAT, pickle.BININT1 + b"\x00"), _p_str("__class__")), "on a _MEM_FORMAT_ENCODING, not on an enum of the index"),
        (_p_call(GETATTR, _p_global("torch", "Size"), _p_str("__new__")), "on a type, not on an enum"),
        (_p_call(GETATTR, _p_global("collections", "OrderedDict"), _p_str("fromkeys")), "on a type, not on an enum"),
        (_p_call(GETATTR, MEM_FORMAT, _p_str("NOT_A_MEMBER"), pickle.NONE), "with 3 arguments"),
        (_p_call(GETATTR, MEM_FORMAT), "with 1 arguments"),
        (_getattr_chain_to_system("true")[2:-1], "for '__init__', which is not a member"),
    ],
    ids=["dunder-init", "member-map", "class", "non-string", "member-attribute", "not-an-enum", "ordered-dict", "default", "one-arg", "chain-to-system"],
)  # fmt: skip
def test_getattr_is_refused_beyond_enum_members(tmp_path, expr, reason):
    (tmp_path / ".metadata").write_bytes(_pickle_of(expr))
    with pytest.raises(safe_dcp.UnsafeCheckpointError) as e:
        safe_dcp.read_index(tmp_path)
    message = str(e.value)
    assert "\n" not in message and f"it calls builtins.getattr {reason}" in message and message.endswith("nothing in it ran")
    # Negative control: the same pickle unpickles with Python's own unpickler (or fails only in getattr).
    try:
        pickle.loads(_pickle_of(expr))
    except (AttributeError, TypeError):
        pass


def test_getattr_chain_runs_its_command_under_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(_getattr_chain_to_system(f"touch {marker}"))
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# The index as each supported Python writes it (tests/support/pickle_forms.py; tests/data/pickle_forms)

FORMS = ROOT / "tests" / "data" / "pickle_forms"


def _expected_index() -> Metadata:
    """tests/support/pickle_forms.py's index, built with torch's own classes."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )  # fmt: skip

    entries, records, offset = {}, {}, 0
    for fqn, dtype, size, chunks in (
        ("w", torch.float32, (4, 3), [((0, 0), (2, 3)), ((2, 0), (2, 3))]),
        ("step", torch.int64, (), [((), ())]),
    ):
        props = TensorProperties(dtype, torch.strided, False, torch.contiguous_format, False)
        metas = [ChunkStorageMetadata(torch.Size(o), torch.Size(n)) for o, n in chunks]
        entries[fqn] = TensorStorageMetadata(props, torch.Size(size), metas)
        for o, _ in chunks:
            records[MetadataIndex(fqn, torch.Size(o))] = _StorageInfo("__0_0.distcp", offset, 1000, [])
            offset += 1000
    storage = StorageMeta(Path(pickle_forms.CHECKPOINT_ID), "save-id", None, [])
    return Metadata(entries, None, records, storage, "1.0.0")


def _form_files() -> list[Path]:
    return sorted(FORMS.glob("python-*.pickle"))


@pytest.mark.slow
def test_the_forms_cover_every_supported_python():
    versions = {p.stem.removeprefix("python-") for p in _form_files()}
    assert {v.rsplit(".", 1)[0] for v in versions} >= {"3.10", "3.11", "3.12", "3.13"}
    assert "3.11.2" in versions  # Debian 12's, whose enums go by name
    by_name = {p.stem for p in _form_files() if b"getattr" in p.read_bytes()}
    assert by_name == {"python-3.11.2"}
    assert {p.stem for p in _form_files() if b"pathlib._local" in p.read_bytes()} == {"python-3.13.0"}


@pytest.mark.parametrize("path", _form_files(), ids=lambda p: p.stem)
def test_index_pickled_by_each_python_is_read(tmp_path, path):
    (tmp_path / ".metadata").write_bytes(path.read_bytes())
    (tmp_path / "__0_0.distcp").write_bytes(bytes(3000))
    assert safe_dcp.read_index(tmp_path) == _expected_index()


@pytest.mark.slow
def test_pickle_forms_stand_in_for_torch():
    """The stubs carry torch's field names, and the running Python's pickle of them reads back as the
    same index as torch's own objects pickled by the same Python."""
    import dataclasses

    from torch.distributed.checkpoint import filesystem, metadata

    for module, table in pickle_forms.FIELDS.items():
        mod = {"torch.distributed.checkpoint.metadata": metadata, "torch.distributed.checkpoint.filesystem": filesystem}[module]
        for name, fields in table.items():
            assert [f.name for f in dataclasses.fields(getattr(mod, name))] == fields, name
    assert {m.name: m.value for m in metadata._MEM_FORMAT_ENCODING} == pickle_forms.MEM_FORMATS
    stub = subprocess.run(
        [sys.executable, "-c", "import sys, pickle, pickle_forms; "
         "sys.stdout.buffer.write(pickle.dumps(pickle_forms.index(pickle_forms._install_stubs())))"],
        cwd=ROOT / "tests" / "support", capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    real = pickle.dumps(_expected_index())
    assert pickle.loads(stub) == pickle.loads(real) == _expected_index()
    assert _read(stub) == _read(real)


def _pythons_here() -> dict[str, str]:
    """{version: interpreter} for the Pythons this machine has: pyenv's and the system's own."""
    found = {}
    candidates = sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"), "versions").glob("3.*/bin/python"))
    system = shutil.which("python3", path=os.confstr("CS_PATH"))
    for exe in [*map(str, candidates), *([system] if system else [])]:
        r = subprocess.run([exe, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True, check=False)
        if r.returncode == 0:
            found[r.stdout.strip()] = exe
    return found


@pytest.mark.slow
def test_pickle_forms_are_what_each_python_here_writes(tmp_path):
    """Regenerated by every Python on this machine whose version has a stored form: the same bytes."""
    pythons = _pythons_here()
    compared = []
    for path in _form_files():
        version = path.stem.removeprefix("python-")
        if version in pythons:
            out = tmp_path / path.name
            subprocess.run([pythons[version], "tests/support/pickle_forms.py", str(out)], cwd=ROOT, check=True, timeout=60)
            assert out.read_bytes() == path.read_bytes(), version
            compared.append(version)
    if not compared:
        pytest.skip(f"none of the stored forms' Pythons is on this machine (found {sorted(pythons)})")
