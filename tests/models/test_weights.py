"""Hugging Face and Meta checkpoints: configs, loading at TP 1/2/3, exports, conversion, refusals.

Tolerances. Our model and ``transformers.LlamaForCausalLM`` compute the same float32 function with
different kernels (rotary on pairs vs halves, our SDPA vs theirs), so their logits agree to float32
rounding: a relative (Frobenius) error below 1e-5. A negative control shows that an error in the
q/k permutation moves the logits by far more, so that bound cannot pass vacuously. Meta checkpoints
are written in float64 from a float64 model: a different TP size only changes the reduction order
(relative error below 1e-12), the same TP size reproduces the logits exactly, and every conversion
or export must reproduce every tensor bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.llama_checkpoints import META_CFG, hf, meta  # noqa: F401  (hf, meta: fixtures)
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn.ffn import llama_ffn_hidden_dim
from tp_ffn.models import (
    LlamaConfig,
    Transformer,
    config_from_hf,
    config_from_meta,
    config_from_pretrained,
    convert_checkpoint,
    detect_format,
    export_hf,
    export_meta,
    ffn_rule_for,
    load_hf_checkpoint,
    load_meta_checkpoint,
    load_pretrained,
)

ROOT = Path(__file__).resolve().parents[2]
SHARDED_HF = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny random HF checkpoint (single file and sharded) and Meta exports of a float64 model


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "dim, hidden",
    [(4096, 11008), (4096, 14336), (8192, 28672), (16384, 53248), (64, 172), (64, 77), (64, 1), (96, 200)],
)
def test_ffn_rule_for_reproduces_the_size(dim, hidden):
    multiple_of, mult = ffn_rule_for(dim, hidden)
    assert llama_ffn_hidden_dim(dim, multiple_of=multiple_of, ffn_dim_multiplier=mult) == hidden
    if (dim, hidden) == (4096, 11008):
        assert (multiple_of, mult) == (256, None)  # Llama-2-7B's own rule


def test_ffn_rule_for_sweep_and_errors():
    g = torch.Generator().manual_seed(0)
    for dim, hidden in torch.randint(1, 30000, (400, 2), generator=g).tolist():
        m, mult = ffn_rule_for(dim, hidden)
        assert llama_ffn_hidden_dim(dim, multiple_of=m, ffn_dim_multiplier=mult) == hidden, (dim, hidden)
    with pytest.raises(ValueError, match="hidden_dim: expected a positive int, got 0"):
        ffn_rule_for(64, 0)


def test_config_from_hf(hf):
    cfg = config_from_hf(hf["single"])
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (64, 2, 4, 2, 256)
    assert (cfg.hidden_dim, cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (172, 1e-5, 10000.0, 64)
    assert config_from_pretrained(hf["sharded"]) == cfg
    assert config_from_hf(hf["single"], max_seq_len=16).max_seq_len == 16


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling: not supported"),
        ({"attention_bias": True}, "attention_bias: not supported"),
        ({"mlp_bias": True}, "mlp_bias: not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings: not supported"),
        ({"hidden_act": "gelu"}, "hidden_act: expected 'silu'"),
        ({"model_type": "mistral"}, "model_type: expected 'llama'"),
        ({"head_dim": 32}, "head_dim: expected hidden_size / num_attention_heads"),
        ({"intermediate_size": 0}, "intermediate_size: hidden_dim: expected a positive int"),
        ({"intermediate_size": None}, "missing fields"),
    ],
)
def test_config_from_hf_refuses(tmp_path, hf, change, match):
    data = json.loads((hf["single"] / "config.json").read_text())
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None or k == "rope_scaling"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        config_from_hf(tmp_path)


def test_config_from_meta(meta, tmp_path):
    assert config_from_meta(meta["root"] / "mp2", max_seq_len=32) == META_CFG
    params = json.loads((meta["root"] / "mp2" / "params.json").read_text())
    assert "max_seq_len" not in params  # Meta's code passes it besides **params
    refusals = [
        ({"use_scaled_rope": True}, "use_scaled_rope: not supported"),
        ({"n_expert": 8}, r"unknown fields \['n_expert'\]"),
    ]
    for change, match in refusals:
        (tmp_path / "params.json").write_text(json.dumps({**params, **change}))
        with pytest.raises(ValueError, match=match):
            config_from_meta(tmp_path)


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoints against transformers


def test_hf_logits_tp1(hf):
    for path in (hf["single"], hf["sharded"]):
        for device in ("meta", None):  # new parameters, and copies into existing ones
            model = Transformer(config_from_pretrained(path), device=device)
            load_pretrained(model, path, device="cpu" if device else None)
            assert all(p.device.type == "cpu" for p in model.parameters())
            with torch.no_grad():
                assert rel_err(model(hf["tokens"]), hf["logits"]) < 1e-5, (path.name, device)
    # Negative control: the same tensors without undoing HF's q/k permutation.
    raw = load_file(hf["single"] / "model.safetensors")
    renamed = {}
    from tp_ffn.models.weight_names import weight_layout

    for e in weight_layout(model.cfg):
        renamed[e.name] = raw[e.hf]
    model.load_state_dict(renamed)
    with torch.no_grad():
        assert rel_err(model(hf["tokens"]), hf["logits"]) > 1e-2


class _SpySlice:
    def __init__(self, sl, name, log):
        self._sl, self._name, self._log = sl, name, log

    def __getitem__(self, index):
        out = self._sl[index]
        self._log.append((self._name, tuple(out.shape)))
        return out

    def __getattr__(self, attr):
        return getattr(self._sl, attr)


class _SpyHandle:
    def __init__(self, handle, log):
        self._h, self._log = handle, log

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def get_slice(self, name):
        return _SpySlice(self._h.get_slice(name), name, self._log)

    def get_tensor(self, name):
        self._log.append((name, "get_tensor"))
        return self._h.get_tensor(name)

    def __getattr__(self, attr):
        return getattr(self._h, attr)


def _hf_rank(rank: int, world: int, paths: list[str], tokens: torch.Tensor, export_to: str) -> dict:
    import safetensors

    out, reads = [], []
    original = safetensors.safe_open
    safetensors.safe_open = lambda *a, **k: _SpyHandle(original(*a, **k), reads)
    try:
        for path in paths:
            for device in ("meta", None):
                model = Transformer(config_from_hf(path), device=device)
                load_hf_checkpoint(model, path)
                with torch.no_grad():
                    out.append(model(tokens))
    finally:
        safetensors.safe_open = original
    export_hf(model, export_to)
    return {"logits": out, "reads": reads}


@pytest.mark.timeout(120)
def test_hf_logits_tp2_reads_only_own_slices_and_exports(hf):
    dest = hf["root"] / "export_tp2"
    results = run_ranks(2, _hf_rank, [str(hf["single"]), str(hf["sharded"])], hf["tokens"], str(dest))
    full = {k: tuple(v.shape) for k, v in load_file(hf["single"] / "model.safetensors").items()}
    for rank, r in enumerate(results):
        for logits in r["logits"]:
            assert rel_err(logits, hf["logits"]) < 1e-5, rank
        assert r["reads"] and not [x for x in r["reads"] if x[1] == "get_tensor"]
        for name, shape in r["reads"]:
            if any(s in name for s in SHARDED_HF):
                dim = 1 if ("o_proj" in name or "down_proj" in name) else 0
                want = list(full[name])
                want[dim] //= 2
                assert shape == tuple(want), (rank, name, shape)  # never the full tensor
            else:
                assert shape == full[name], (rank, name, shape)  # embeddings and norms are replicated
    # The export gathers TP 2's shards back into HF's layout bit for bit, and transformers loads it.
    from transformers import LlamaForCausalLM

    original, exported = load_file(hf["single"] / "model.safetensors"), load_file(dest / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(dest).eval()(hf["tokens"]).logits
    assert torch.equal(logits, hf["logits"])
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# --------------------------------------------------------------------------------------------------
# Meta checkpoints at any TP size


def _meta_rank(rank: int, world: int, root: str, tokens: torch.Tensor, export_to: str | None) -> list[torch.Tensor]:
    out = []
    for n in (1, 2, 4):
        model = Transformer(config_from_meta(Path(root) / f"mp{n}", max_seq_len=32), dtype=torch.float64, device="meta")
        load_meta_checkpoint(model, Path(root) / f"mp{n}")
        with torch.no_grad():
            out.append(model(tokens))
        if n == 2 and export_to:
            export_meta(model, export_to, 4)  # MP 2 -> TP world -> MP 4
    return out


def test_meta_shards_into_tp1(meta):
    # In this process, without torch.distributed: MP=2 and MP=4 into world size 1.
    for logits in _meta_rank(0, 1, str(meta["root"]), meta["tokens"], None):
        assert torch.equal(logits, meta["logits"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_meta_shards_into_tp(meta, world):
    dest = meta["root"] / f"reexport_tp{world}"
    for rank, per_mp in enumerate(run_ranks(world, _meta_rank, str(meta["root"]), meta["tokens"], str(dest))):
        for n, logits in zip((1, 2, 4), per_mp):
            assert rel_err(logits, meta["logits"]) < 1e-12, (rank, n)
    for i in range(4):
        want = torch.load(meta["root"] / "mp4" / f"consolidated.{i:02d}.pth", weights_only=True)
        got = torch.load(dest / f"consolidated.{i:02d}.pth", weights_only=True)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), i


def test_meta_embedding_dim_split_and_unknown_vocab(meta, tmp_path):
    # The export splits tok_embeddings on the vocabulary (Llama 3); Llama 2 splits it on the
    # embedding dimension and writes "vocab_size": -1.
    src = meta["root"] / "mp2"
    shards = [torch.load(src / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    emb = torch.cat([s["tok_embeddings.weight"] for s in shards], 0)
    for s, block in zip(shards, torch.tensor_split(emb, 2, 1)):
        s["tok_embeddings.weight"] = block.clone()
    for i, s in enumerate(shards):
        torch.save(s, tmp_path / f"consolidated.0{i}.pth")
    params = json.loads((src / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert config_from_meta(tmp_path, max_seq_len=32) == META_CFG
    assert config_from_meta(src.parent / "mp4").vocab_size == META_CFG.vocab_size
    model = Transformer(META_CFG, dtype=torch.float64, device="meta")
    load_pretrained(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(meta["tokens"]), meta["logits"])


def test_meta_export_splits_the_embedding_by_vocabulary_unless_told_dim(meta, tmp_path):
    # Llama 3 / llama-models load tok_embeddings split by vocabulary (VocabParallelEmbedding); Llama 2
    # by embedding dimension (ParallelEmbedding). 250 rows over 3 shards: 84, 83, 83.
    full = meta["model"].tok_embeddings.weight.detach()
    for split, dim, shapes in (("vocab", 0, [(84, 96), (83, 96), (83, 96)]), ("dim", 1, [(250, 32)] * 3)):
        kw = {} if split == "vocab" else {"embedding_split": "dim"}
        export_meta(meta["model"], tmp_path / f"export_{split}", 3, **kw)
        convert_checkpoint(meta["root"] / "mp2", tmp_path / f"convert_{split}", to="meta", num_shards=3, **kw)
        for out in (tmp_path / f"export_{split}", tmp_path / f"convert_{split}"):
            shards = [torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(3)]
            blocks = [s["tok_embeddings.weight"] for s in shards]
            assert [tuple(b.shape) for b in blocks] == shapes, out
            assert torch.equal(torch.cat(blocks, dim), full), out
        model = Transformer(META_CFG, dtype=torch.float64, device="meta")
        load_pretrained(model, tmp_path / f"export_{split}")
        with torch.no_grad():
            assert torch.equal(model(meta["tokens"]), meta["logits"]), split
    for bad in ("rows", None):
        with pytest.raises(ValueError, match=f"embedding_split: expected 'vocab' .* or 'dim' .*, got {bad!r}"):
            export_meta(meta["model"], tmp_path / "x", 2, embedding_split=bad)
        with pytest.raises(ValueError, match=f"embedding_split: expected 'vocab' .* or 'dim' .*, got {bad!r}"):
            convert_checkpoint(meta["root"] / "mp2", tmp_path / "x", to="hf", embedding_split=bad)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# Conversion


def _same_files(a: Path, b: Path) -> None:
    for f in sorted(a.glob("*.safetensors")):
        x, y = load_file(f), load_file(b / f.name)
        assert sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x), f.name


def test_convert_round_trips_bit_exact(hf, tmp_path):
    # bfloat16 too: the converter never casts.
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    shutil.copy(hf["single"] / "config.json", bf16)
    tensors = load_file(hf["single"] / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, bf16 / "model.safetensors", {"format": "pt"})
    for src in (hf["sharded"], bf16):
        seen = []
        progress = lambda it, desc: seen.append(desc) or it  # noqa: E731
        assert (
            convert_checkpoint(src, tmp_path / "m2", to="meta", num_shards=2, overwrite=True, progress=progress) == "hf"
        )
        assert seen == ["read hf", "meta shards"]
        convert_checkpoint(tmp_path / "m2", tmp_path / "m3", to="meta", num_shards=1, overwrite=True)  # reshard
        assert convert_checkpoint(tmp_path / "m3", tmp_path / "back", to="hf", overwrite=True, max_seq_len=64) == "meta"
        want = hf["single"] if src == hf["sharded"] else bf16
        _same_files(want, tmp_path / "back")
        assert config_from_hf(tmp_path / "back") == config_from_hf(want)
        assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == str(
            load_file(want / "model.safetensors")["lm_head.weight"].dtype
        ).removeprefix("torch.")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_convert_script(hf, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def script(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "scripts/convert_checkpoint.py", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)

    r = script("--from", "hf", "--to", "meta", "--num-shards", "2", str(hf["sharded"]), str(tmp_path / "meta"))
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "meta").iterdir())
    assert written == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    assert "100%" in r.stderr  # the progress bar
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    r = script("--from", "meta", "--to", "hf", str(tmp_path / "meta"), str(tmp_path / "hf"))
    assert r.returncode != 0 and "exists and is not empty; pass --force" in r.stderr
    assert (tmp_path / "hf" / "keep.txt").exists()
    r = script(
        "--from", "meta", "--to", "hf", "--force", "--max-seq-len", "64", str(tmp_path / "meta"), str(tmp_path / "hf")
    )
    assert r.returncode == 0, r.stderr
    assert config_from_hf(tmp_path / "hf") == config_from_hf(hf["single"])
    assert not (tmp_path / "hf" / "keep.txt").exists()
    _same_files(hf["single"], tmp_path / "hf")
    # Bad input found after the arguments parse: one line, status 2 (as argparse's own), nothing written.
    for args, message in (
        (("--from", "meta", "--to", "hf", str(hf["sharded"])), "--from meta: but"),
        (
            ("--from", "hf", "--to", "meta", "--num-shards", "100000", str(hf["sharded"])),
            "num_shards: expected at most",
        ),
    ):
        r = script(*args, str(tmp_path / "refused"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_meta_shards_hold_whole_heads(tmp_path):
    """4 key/value heads over 8 shards were split in half without a word; Meta's code gives every
    model-parallel rank n_kv_heads // MP whole heads. Refused by export_meta, convert_checkpoint and
    the script (exit 2, nothing written); 4 shards still work."""
    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    src = tmp_path / "mp1"
    export_meta(model, src, 1)
    message = r"num_shards: .*8 shards would split the model's 8 query / 4 key-value heads; refused .*work: 1, 2, 4"
    with pytest.raises(ValueError, match=message):
        export_meta(model, tmp_path / "mp8", 8)
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, tmp_path / "mp8", to="meta", num_shards=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "scripts/convert_checkpoint.py", "--from", "meta", "--to", "meta", "--num-shards", "8"]
    cmd += [str(src), str(tmp_path / "mp8")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 2 and r.stderr.startswith("convert_checkpoint.py: error: num_shards:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "mp8").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    convert_checkpoint(src, tmp_path / "mp4", to="meta", num_shards=4)
    wk = [torch.load(tmp_path / "mp4" / f"consolidated.{i:02d}.pth")["layers.0.attention.wk.weight"] for i in range(4)]
    assert [tuple(w.shape) for w in wk] == [(cfg.head_dim, cfg.dim)] * 4  # one whole key head each


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_convert_script_bad_sources_exit_2(tmp_path):
    """A SRC that holds no checkpoint of the --from kind: one line naming it, status 2 (as every
    script's bad input), nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    for kind, message in (("train", "no complete checkpoint"), ("hf", "not a checkpoint this package reads")):
        cmd = [sys.executable, "scripts/convert_checkpoint.py", "--from", kind, "--to", "hf"]
        r = subprocess.run([*cmd, str(tmp_path / "src"), str(tmp_path / "dst")], check=False, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=100)  # fmt: skip
        assert r.returncode == 2, (kind, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert_checkpoint.py: error: ") and message in lines[0], lines
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------------------------------
# Refusals: nothing is written into the model, nothing runs, nothing half-written is left


def _hf_variant(hf, tmp_path: Path, edit) -> Path:
    out = tmp_path / "variant"
    out.mkdir()
    shutil.copy(hf["single"] / "config.json", out)
    tensors = load_file(hf["single"] / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", {"format": "pt"})
    return out


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing keys \['model.layers.1.mlp.up_proj.weight'\], unexpected keys \[\]"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), r"unexpected keys \['model.layers.0.self_attn.q_proj.bias'\]"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(63)}), r"model.norm.weight: expected shape \(64,\), got \(63,\)"),
        (lambda t: t.update({"lm_head.weight": torch.zeros(256, 64, dtype=torch.int32)}), "lm_head.weight: expected a floating-point dtype"),
    ],
)  # fmt: skip
def test_hf_bad_checkpoint_leaves_model_untouched(hf, tmp_path, edit, match):
    model = Transformer(config_from_hf(hf["single"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_hf_checkpoint(model, _hf_variant(hf, tmp_path, edit))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_read_error_after_validation_leaves_model_untouched(hf, monkeypatch):
    from tp_ffn.models.hf_files import HFReader

    model = Transformer(config_from_hf(hf["single"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = HFReader.read, []

    def flaky(self, *args):
        calls.append(args[0].name)
        if len(calls) == 10:
            raise OSError("I/O error")
        return real(self, *args)

    monkeypatch.setattr(HFReader, "read", flaky)
    with pytest.raises(OSError, match="I/O error"):
        load_hf_checkpoint(model, hf["single"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _meta_variant(meta, tmp_path: Path, n: int, edit) -> Path:
    out = tmp_path / "variant"
    shutil.copytree(meta["root"] / f"mp{n}", out)
    edit(out)
    return out


def _edit_shard(path: Path, fn) -> None:
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: _edit_shard(d / "consolidated.01.pth", lambda sd: sd.pop("layers.0.feed_forward.w2.weight")),
         r"consolidated.01.pth: missing keys \['layers.0.feed_forward.w2.weight'\]"),
        (lambda d: _edit_shard(d / "consolidated.01.pth", lambda sd: sd.update({"extra": torch.zeros(1)})),
         r"consolidated.01.pth: missing keys \[\], unexpected keys \['extra'\]"),
        (lambda d: _edit_shard(d / "consolidated.01.pth", lambda sd: sd.update({"layers.1.feed_forward.w1.weight": torch.zeros(99, 96)})),
         r"layers.1.feed_forward.w1.weight: expected full shape \(200, 96\) split over 2 shards on dim 0, got shard shapes \[\(100, 96\), \(99, 96\)\]"),
        (lambda d: (d / "consolidated.00.pth").unlink(), r"shards are missing: no consolidated.00.pth"),
        (lambda d: (d / "params.json").write_text(json.dumps({**json.loads((d / "params.json").read_text()), "n_heads": 8, "n_kv_heads": 4})),
         r"does not match the model's: n_heads: model 24, checkpoint 8; kv_heads: model 12, checkpoint 4"),
    ],
)  # fmt: skip
def test_meta_bad_checkpoint_leaves_model_untouched(meta, tmp_path, edit, match):
    model = Transformer(META_CFG, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_meta_checkpoint(model, _meta_variant(meta, tmp_path, 2, edit))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _RunsCode:
    """Pickles as a call of ``exec``: unpickling it with weights_only=False creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.slow
def test_pickled_code_is_refused_and_never_runs(meta, tmp_path):
    ckpt = _meta_variant(meta, tmp_path, 1, lambda d: None)
    marker = tmp_path / "pwned"
    _edit_shard(ckpt / "consolidated.00.pth", lambda sd: sd.update({"rope.freqs": _RunsCode(marker)}))
    model = Transformer(META_CFG, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: refused: .* may carry code, which was not run"):
        load_pretrained(model, ckpt)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    with pytest.raises(ValueError, match="refused"):
        config_from_meta(ckpt)
    assert not marker.exists()
    # Negative control: the file really runs code when unpickled without weights_only.
    code = f"import torch; torch.load({str(ckpt / 'consolidated.00.pth')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
    assert marker.exists()


def test_unknown_directories(tmp_path, hf):
    with pytest.raises(ValueError, match="not a directory"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not a checkpoint this package reads: .* found \[\]"):
        config_from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"found \['config.json', 'pytorch_model.bin'\]"):
        load_pretrained(Transformer(config_from_hf(hf["single"])), tmp_path)
    with pytest.raises(ValueError, match="Meta params.json"):
        config_from_meta(tmp_path)


def test_exports_refuse_to_overwrite_and_never_leave_half_a_directory(meta, tmp_path, monkeypatch):
    model = meta["model"]
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        export_meta(model, dest, 2)
    with pytest.raises(ValueError, match=r"num_shards: expected at most 48"):
        export_meta(model, tmp_path / "x", 97)
    export_hf(model, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]

    calls = []

    def crash(obj, f, *a, **k):
        calls.append(f)
        if len(calls) % 2 == 0:  # the second shard of each export
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_meta(model, tmp_path / "crashed", 4)
    with pytest.raises(OSError, match="disk full"):
        export_meta(model, dest, 4, overwrite=True)
    assert len(calls) == 4
    assert not (tmp_path / "crashed").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]  # the old one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
