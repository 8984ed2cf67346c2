"""One-call loading: ``tp_ffn.models.llama.load_pretrained(path, *, group=None, device=None)``.

The checkpoints are tests/support/llama_checkpoints.py's fixtures: a tiny random Hugging Face ``LlamaForCausalLM``
(single file and sharded safetensors; the reference is transformers' own logits) and Meta exports
(MP 1, 2, 4) of a float64 model (the reference is that model's logits). Tolerances as there: 1e-5
relative against transformers (float32 kernels differ), exact or 1e-12 for the float64 Meta files.
The memory test samples the resident anonymous memory of fresh TP-2 processes while they load;
its control clones the whole checkpoint and must add about the full size.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.llama_checkpoints import hf, meta  # noqa: F401  (fixtures of this module too)
from support.rankpool import run_fresh, run_ranks
from support.reference import rel_err

from tp_ffn.models.llama import Transformer, load_pretrained, precompute_rope

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


def _check_materialised(model: Transformer, device: str, dtype: torch.dtype) -> None:
    assert not model.training
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == device, name
    assert {p.dtype for p in model.parameters()} == {dtype}
    cos, sin = precompute_rope(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)


@pytest.mark.slow
def test_signature_and_lazy_imports():
    sig = inspect.signature(load_pretrained)
    assert list(sig.parameters)[:3] == ["path", "group", "device"]
    assert all(sig.parameters[k].kind is inspect.Parameter.KEYWORD_ONLY for k in ("group", "device", "dtype"))
    assert all(sig.parameters[k].default is None for k in ("group", "device", "dtype"))
    assert inspect.signature(Transformer.from_pretrained).parameters.keys() == sig.parameters.keys()
    # Importing the model module pulls in none of the optional dependencies (torch itself imports tqdm).
    code = (
        "import sys, tp_ffn.models.llama; "
        "opt = ('safetensors', 'transformers', 'tokenizers', 'tiktoken', 'sentencepiece', 'matplotlib'); "
        "heavy = [m for m in opt if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_single_process_group_none(hf, meta):
    # No torch.distributed here: group=None is a world of one.
    for path in (hf["single"], hf["sharded"]):
        model = load_pretrained(path)
        _check_materialised(model, "cpu", torch.float32)
        with torch.no_grad():
            assert rel_err(model(hf["tokens"]), hf["logits"]) < 1e-5, path.name
    model = Transformer.from_pretrained(hf["single"], device="cpu", dtype=torch.float64)
    _check_materialised(model, "cpu", torch.float64)
    with torch.no_grad():
        assert rel_err(model(hf["tokens"]), hf["logits"]) < 1e-5
    for n in (1, 2, 4):
        model = load_pretrained(meta["root"] / f"mp{n}", dtype=torch.float64)
        _check_materialised(model, "cpu", torch.float64)
        with torch.no_grad():
            assert torch.equal(model(meta["tokens"]), meta["logits"]), n
    with pytest.raises(ValueError, match="not a checkpoint this package reads"):
        load_pretrained(hf["root"])


def _tp_rank(rank: int, world: int, hf_paths: list[str], meta_root: str, hf_tokens, meta_tokens) -> dict:
    import torch.distributed as dist

    out: dict = {"hf": [], "meta": []}
    for path in hf_paths:
        for group in (None, dist.group.WORLD):
            model = load_pretrained(path, group=group)
            _check_materialised(model, "cpu", torch.float32)
            with torch.no_grad():
                out["hf"].append(model(hf_tokens))
    out["wq_rows"] = model.layers[0].attention.wq.weight.shape[0]
    out["w2_cols"] = model.layers[0].feed_forward.w2.weight.shape[1]
    for n in (1, 2, 4):
        model = Transformer.from_pretrained(Path(meta_root) / f"mp{n}", dtype=torch.float64)
        with torch.no_grad():
            out["meta"].append(model(meta_tokens))
    return out


@pytest.mark.timeout(180)
def test_tp2_loads_hf_and_meta(hf, meta):
    paths = [str(hf["single"]), str(hf["sharded"])]
    results = run_ranks(2, _tp_rank, paths, str(meta["root"]), hf["tokens"], meta["tokens"])
    full = load_pretrained(hf["single"])
    for rank, r in enumerate(results):
        assert len(r["hf"]) == 4 and len(r["meta"]) == 3
        for logits in r["hf"]:
            assert rel_err(logits, hf["logits"]) < 1e-5, rank
        for logits in r["meta"]:
            assert rel_err(logits, meta["logits"]) < 1e-12, rank
        # This rank's slices only: half the query rows and half of w2's columns.
        assert r["wq_rows"] * 2 == full.layers[0].attention.wq.weight.shape[0]
        assert r["w2_cols"] * 2 == full.layers[0].feed_forward.w2.weight.shape[1]


# --------------------------------------------------------------------------------------------------
# Memory: the shard, never the whole model

BIG = {
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 8, "vocab_size": 512, "max_position_embeddings": 64,
}  # fmt: skip


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    return kib / 1024


def _load_memory(rank: int, world: int, big: str, small: str) -> dict[str, float]:
    import torch.distributed as dist
    from safetensors.torch import load_file

    from tp_ffn.models.hf_files import HFReader

    load_pretrained(small, group=dist.group.WORLD)  # map the code paths first
    samples: list[float] = []
    original = HFReader.read

    def read(self, *args):
        x = original(self, *args)
        samples.append(_status_mib("RssAnon"))
        return x

    HFReader.read = read
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        rss, anon = _status_mib("VmRSS"), _status_mib("RssAnon")
        model = load_pretrained(big, group=dist.group.WORLD)
        hwm = _status_mib("VmHWM") - rss
    finally:
        HFReader.read = original
    out = {
        "shard": sum(p.numel() * p.element_size() for p in model.parameters()) / MiB,
        "anon_peak": max(samples) - anon,  # after every tensor read: the values waiting to be assigned
        "held": _status_mib("VmRSS") - rss,  # once loaded: the parameters, nothing mapped
        "hwm": hwm,  # also counts the file's pages mapped while they are read (page cache, reclaimable)
    }
    with open("/proc/self/maps") as f:
        out["mapped"] = "model.safetensors" in f.read()
    anon = _status_mib("RssAnon")
    whole = {k: v.clone() for k, v in load_file(Path(big) / "model.safetensors").items()}
    out["control"] = _status_mib("RssAnon") - anon  # the whole model, seen by the same instrument
    out["full"] = sum(t.numel() * t.element_size() for t in whole.values()) / MiB
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_memory_is_the_shard(tmp_path):
    """At TP 2 each rank's resident anonymous memory grows by its shard (half the model), never the whole.

    Sampled after every tensor read (the values are all read before any is assigned, so the last
    sample is the peak up to one tensor's transient) and once loaded; the control clones the whole
    checkpoint and must add about its full size. No parameter may keep the file mapped.
    """
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(**BIG)).save_pretrained(tmp_path / "big", safe_serialization=True)
    small = {**BIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 64}
    LlamaForCausalLM(HFConfig(**small)).save_pretrained(tmp_path / "small", safe_serialization=True)
    for r in run_fresh(2, _load_memory, str(tmp_path / "big"), str(tmp_path / "small")):
        assert r["shard"] < 0.55 * r["full"], r
        assert r["anon_peak"] < r["shard"] + 0.1 * r["full"], r
        assert r["held"] < r["shard"] + 0.1 * r["full"], r
        assert not r["mapped"], r
        assert r["control"] > 0.9 * r["full"], r
