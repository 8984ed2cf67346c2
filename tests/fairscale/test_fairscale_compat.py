"""tp_ffn.fairscale: Meta's Llama code after the README's sed line, held against Hugging Face and fairscale 0.4.13.

- ``meta_style_llama.py`` is a Llama model and loader written the way Meta's reference code is
  (fairscale import paths and constructor calls; our own code). Run as written it uses fairscale;
  after the README's ``sed`` substitution it uses ``tp_ffn.fairscale``. It loads the
  ``consolidated.XX.pth`` files that ``scripts/convert_checkpoint.py --to meta`` writes from a tiny
  random ``transformers.LlamaForCausalLM`` at MP = 1, 2 and 4 (vocabulary-split embeddings, Llama
  3's ``VocabParallelEmbedding``; and ``--meta-embedding-split dim``, Llama 2's
  ``ParallelEmbedding``), and its logits (a prompt, then token-by-token decoding through the KV
  cache) must match HF's for the same tokens, on every rank.
- Each layer, and the region mappings, against fairscale's on the same gloo group at W = 2 and 4:
  the same seed must give bit-identical weights (fairscale's xavier_normal_ on the master weight,
  ``stride=2``, ``keep_master_weight_for_test``) and leave the generator in the same state; the
  outputs and gradients must agree.
- Sizes fairscale refuses (not divisible by W) against a float64 dense reference
  (``F.linear`` / ``F.embedding``), with ``padding_idx``, ``max_norm`` and ``scale_grad_by_freq``.
- ``initialize``: the groups of every (model, pipeline) size at W = 4 are fairscale's; misuse raises.

fairscale on CPU: its layers and ``initialize_model_parallel`` need nothing CUDA-only (see
test_fairscale.py); only its RNG tracker does, which neither Meta's model nor these tests use.

Tolerances. The model runs in float64 (the loader sets the default dtype, as Meta's sets bf16);
its norms and softmax run in float32 in both models, on the same values, so the logits agree to
float64 rounding (measured: 2.4e-16 relative at MP 1, 2 and 4). ``LOGITS_TOL`` = 1e-12 leaves room
for a float32 rounding that a last-bit difference could flip, and is far below what a float32
difference in a reduction shows (2e-7, seen while the gathered embedding was a strided view).
Negative controls: the MP=2 shards handed to the wrong ranks must move the logits by more than
1e-3; a Llama 2 (dim-split) checkpoint in a Llama 3 model must be refused. tp_ffn and fairscale run
the same operations in the same order on the same shards, so their logits must be bit-identical.
Layers: float32, at most 16 features; the two implementations agree to ``LAYER_TOL`` = 1e-6
relative (measured: 0; one shard scaled by 1 + 1e-3 shows above 100x that), and the float64 dense
reference to ``DENSE_TOL`` = 1e-5 (measured: 2e-7, a few float32 ulps).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from support.rankpool import run_ranks
from support.reference import rel_err

ROOT = Path(__file__).resolve().parents[2]
META_SRC = Path(__file__).resolve().parents[1] / "support" / "meta_style_llama.py"
# The README's line (and docs/meta-fairscale.md's): sed -i 's/fairscale\.nn\.model_parallel/tp_ffn.fairscale/g' model.py
SED_SCRIPT = r"s/fairscale\.nn\.model_parallel/tp_ffn.fairscale/g"

# GQA with 8 query / 4 kv heads splits over MP 1, 2, 4; intermediate 192 and vocab 256 divide by 4
# (fairscale's even splits); O(1) random weights make attention and rotary errors visible.
HF_KW = {
    "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "attn_implementation": "eager",
}  # fmt: skip
PROMPT, MAX_SEQ = 5, 16
LOGITS_TOL, LAYER_TOL, DENSE_TOL = 1e-12, 1e-6, 1e-5
CONTROL_MIN = 1e-3


def sed(text: str) -> str:
    """Python's reading of ``SED_SCRIPT``."""
    return re.sub(r"fairscale\.nn\.model_parallel", "tp_ffn.fairscale", text)


def meta_model_module(on: str) -> ModuleType:
    """``meta_style_llama.py`` as written (``on="fairscale"``) or after the sed line (``on="tp_ffn"``)."""
    name = f"_meta_style_llama_on_{on}"
    if name not in sys.modules:
        src = META_SRC.read_text()
        module = ModuleType(name)
        module.__file__ = str(META_SRC)
        sys.modules[name] = module  # dataclasses look the module up while the class is built
        code = compile(sed(src) if on == "tp_ffn" else src, str(META_SRC), "exec")
        exec(code, module.__dict__)  # noqa: S102 - our own test file, as `import` would run it
    return sys.modules[name]


def _convert(*args: str) -> None:
    """``scripts/convert_checkpoint.py ARGS``, run in this process (its ``main``)."""
    name = "_convert_checkpoint_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "convert_checkpoint.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclass looks the module up
        spec.loader.exec_module(sys.modules[name])
    script = sys.modules[name]
    with contextlib.redirect_stdout(io.StringIO()):
        assert script.main(list(args)) == 0, args


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random float64 HF Llama, its logits, and Meta checkpoints written by scripts/convert_checkpoint.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_KW)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0.0, 0.15)
    root = tmp_path_factory.mktemp("fairscale_compat")
    model.save_pretrained(root / "hf", safe_serialization=True)
    tokens = torch.randint(0, HF_KW["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    hf = str(root / "hf")
    for n in (1, 2, 4):
        _convert("--from", "hf", "--to", "meta", "--num-shards", str(n), hf, str(root / f"vocab{n}"))
    for n in (2, 4):
        split = ("--meta-embedding-split", "dim")
        _convert("--from", "hf", "--to", "meta", "--num-shards", str(n), *split, hf, str(root / f"dim{n}"))
    # Negative control: the MP=2 shards handed to the wrong ranks.
    swapped = root / "swapped2"
    swapped.mkdir()
    shutil.copy(root / "vocab2" / "params.json", swapped)
    for i in range(2):
        shutil.copy(root / "vocab2" / f"consolidated.{i:02d}.pth", swapped / f"consolidated.{1 - i:02d}.pth")
    return {"root": root, "tokens": tokens, "logits": logits}


# --------------------------------------------------------------------------------------------------
# Meta-style model on converted checkpoints


def _generate(rank: int, world: int, ckpt: str, tokens: torch.Tensor, on: str, vocab_parallel: bool) -> torch.Tensor:
    """Logits of ``tokens``: the first PROMPT at once, then one token at a time through the KV cache."""
    meta = meta_model_module(on)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as Meta's generation.py sets bf16 / fp16
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            model = meta.build(ckpt, MAX_SEQ, tokens.shape[0], world, vocab_parallel)
        steps = [model(tokens[:, :PROMPT], 0)]
        steps += [model(tokens[:, p : p + 1], p) for p in range(PROMPT, tokens.shape[1])]
        return torch.cat(steps, 1)
    finally:
        torch.set_default_dtype(default)
        meta.fs_init.destroy_model_parallel()


def _load_error(rank: int, world: int, ckpt: str, on: str) -> str:
    try:
        _generate(rank, world, ckpt, torch.zeros(1, PROMPT, dtype=torch.long), on, True)
    except RuntimeError as e:
        return str(e)
    return ""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_meta_style_model_on_converted_checkpoints_matches_hf_and_fairscale(ckpts, world):
    root, tokens, want = ckpts["root"], ckpts["tokens"], ckpts["logits"]
    runs = {(on, "vocab"): (root / f"vocab{world}", True) for on in ("tp_ffn", "fairscale")}
    if world > 1:  # at MP=1 both splits are the same file
        runs.update({(on, "dim"): (root / f"dim{world}", False) for on in ("tp_ffn", "fairscale")})
    got = {
        key: run_ranks(world, _generate, str(path), tokens, key[0], vp, timeout=120) for key, (path, vp) in runs.items()
    }
    failures = []
    for (on, split), per_rank in got.items():
        for rank, logits in enumerate(per_rank):
            err = rel_err(logits, want)
            if err > LOGITS_TOL:
                failures.append(f"{on}, {split} split, rank {rank}: logits vs HF rel err {err:.2e} > {LOGITS_TOL}")
            if on == "tp_ffn" and not torch.equal(logits, got["fairscale", split][rank]):
                diff = rel_err(logits, got["fairscale", split][rank])
                failures.append(f"{split} split, rank {rank}: tp_ffn and fairscale logits differ (rel err {diff:.2e})")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(240)
def test_negative_controls_wrong_shards_and_llama2_layout_in_llama3_model(ckpts):
    root = ckpts["root"]
    for rank, logits in enumerate(run_ranks(2, _generate, str(root / "swapped2"), ckpts["tokens"], "tp_ffn", True)):
        assert rel_err(logits, ckpts["logits"]) > CONTROL_MIN, rank
    # The report: fairscale refuses a dim-split embedding in VocabParallelEmbedding; so do we.
    for on in ("tp_ffn", "fairscale"):
        for message in run_ranks(2, _load_error, str(root / "dim2"), on):
            assert "size mismatch for tok_embeddings.weight" in message, (on, message)
            assert "torch.Size([256, 32])" in message and "torch.Size([128, 64])" in message, (on, message)


@pytest.mark.slow
def test_convert_script_meta_embedding_split(ckpts, tmp_path):
    root = ckpts["root"]
    for split, n, shape in (
        ("vocab", 2, (128, 64)),
        ("vocab", 4, (64, 64)),
        ("dim", 2, (256, 32)),
        ("dim", 4, (256, 16)),
    ):
        for i in range(n):
            shard = torch.load(root / f"{split}{n}" / f"consolidated.{i:02d}.pth", weights_only=True)
            assert tuple(shard["tok_embeddings.weight"].shape) == shape, (split, n, i)
            assert tuple(shard["output.weight"].shape) == (256 // n, 64), (split, n, i)
    # Every other tensor is the same in both layouts; both load back into the same model.
    a = torch.load(root / "vocab2" / "consolidated.01.pth", weights_only=True)
    b = torch.load(root / "dim2" / "consolidated.01.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "tok_embeddings.weight")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for args, message in (
        (["--to", "hf", "--meta-embedding-split", "dim"], "--meta-embedding-split: only meaningful with --to meta"),
        (["--to", "meta", "--meta-embedding-split", "rows"], "invalid choice: 'rows'"),
    ):
        cmd = [
            sys.executable,
            "scripts/convert_checkpoint.py",
            "--from",
            "hf",
            *args,
            str(root / "hf"),
            str(tmp_path / "x"),
        ]
        r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()


_SED_RUN = """
import os, sys, tempfile
sys.modules["fairscale"] = None  # not importable: everything must come from tp_ffn
import torch, torch.distributed as dist
import tp_ffn
assert "tp_ffn.fairscale" not in sys.modules, "the core package must not import its fairscale adapter"
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
import model
torch.set_default_dtype(torch.float64)
m = model.build(sys.argv[1], 16, 2, 1, True)
torch.save(m(torch.load(sys.argv[2]), 0), sys.argv[3])
print(sorted(k for k in sys.modules if "fairscale" in k and sys.modules[k] is not None))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("sed") is None, reason="needs the sed program")
def test_the_readme_sed_line_on_a_file_without_fairscale_installed(ckpts, tmp_path):
    assert f"sed -i '{SED_SCRIPT}' model.py" in (ROOT / "README.md").read_text()  # the line the README shows
    shutil.copy(META_SRC, tmp_path / "model.py")
    subprocess.run(["sed", "-i", SED_SCRIPT, "model.py"], cwd=tmp_path, check=True)
    text = (tmp_path / "model.py").read_text()
    assert text == sed(META_SRC.read_text())  # what the other tests run is what sed writes
    imports = [line for line in text.splitlines() if line.startswith(("import ", "from ")) and "fairscale" in line]
    assert imports == [
        "import tp_ffn.fairscale.initialize as fs_init",
        "from tp_ffn.fairscale.initialize import (",
        "from tp_ffn.fairscale.layers import (",
    ]
    torch.save(ckpts["tokens"], tmp_path / "tokens.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-c", _SED_RUN, str(ckpts["root"] / "vocab1"), "tokens.pt", "logits.pt"]
    r = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.strip()
        == "['tp_ffn.fairscale', 'tp_ffn.fairscale.initialize', 'tp_ffn.fairscale.layers', 'tp_ffn.fairscale.mappings']"
    )
    assert rel_err(torch.load(tmp_path / "logits.pt"), ckpts["logits"]) < LOGITS_TOL


# --------------------------------------------------------------------------------------------------
# Layers and mappings against fairscale's


IN, OUT, VOCAB, DIM, B, S = 12, 16, 16, 8, 2, 3  # OUT divisible by W * stride = 8, as fairscale asserts

LAYER_CASES = {
    "column, gather_output": ("ColumnParallelLinear", (IN, OUT), {"bias": True, "gather_output": True}),
    "column, local output": ("ColumnParallelLinear", (IN, OUT), {"bias": True, "gather_output": False}),
    "column, stride 2, master kept": (
        "ColumnParallelLinear", (IN, OUT),
        {"bias": False, "gather_output": False, "stride": 2, "keep_master_weight_for_test": True},
    ),
    "row, full input": ("RowParallelLinear", (OUT, IN), {"bias": True}),
    "row, parallel input, master kept": (
        "RowParallelLinear", (OUT, IN), {"bias": True, "input_is_parallel": True, "keep_master_weight_for_test": True},
    ),
    "row, stride 2": ("RowParallelLinear", (OUT, IN), {"bias": False, "input_is_parallel": True, "stride": 2}),
    "vocab-parallel embedding": ("VocabParallelEmbedding", (VOCAB, DIM), {}),
    "embedding-dim-parallel embedding": ("ParallelEmbedding", (VOCAB, DIM), {}),
}  # fmt: skip


def _inputs(cls: str, args: tuple[int, int], kw: dict, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same input on every rank (its block where the layer takes one) and an output gradient.

    Replicated outputs get the same gradient on every rank; a rank-local output its own.
    """
    g = torch.Generator().manual_seed(11)
    local_g = torch.Generator().manual_seed(100 + rank)
    if "Embedding" in cls:
        return torch.randint(0, args[0], (B, S), generator=g), torch.randn(B, S, args[1], generator=g)
    x = torch.randn(B, S, args[0], generator=g)
    if kw.get("input_is_parallel"):
        x = x.tensor_split(world, -1)[rank]
    if cls == "ColumnParallelLinear" and not kw["gather_output"]:
        return x, torch.randn(B, S, args[1] // world, generator=local_g)
    return x, torch.randn(B, S, args[1], generator=g)


def _run(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(x.is_floating_point())
    y = layer(x)
    y.backward(gy)
    out = {"output": y.detach(), "weight grad": layer.weight.grad}
    if x.is_floating_point():
        out["input grad"] = x.grad
    if getattr(layer, "bias", None) is not None:
        out["bias grad"] = layer.bias.grad
    return out


def _build(
    layers: ModuleType, cls: str, args: tuple[int, int], kw: dict, seed: int
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The layer built after ``manual_seed(seed)``, and the next draws of the generator."""
    torch.manual_seed(seed)
    layer = getattr(layers, cls)(*args, **kw)
    return layer, torch.rand(4)


def _layers_vs_fairscale(rank: int, world: int) -> tuple[dict[str, float], dict[str, bool], dict[str, float]]:
    from fairscale.nn.model_parallel import initialize as fs_initialize
    from fairscale.nn.model_parallel import layers as fs_layers
    from fairscale.nn.model_parallel import mappings as fs_mappings

    from tp_ffn.fairscale import initialize, layers, mappings

    with contextlib.redirect_stdout(io.StringIO()):
        fs_initialize.initialize_model_parallel(world)
    initialize.initialize_model_parallel(world)
    errors: dict[str, float] = {}
    same: dict[str, bool] = {}
    controls: dict[str, float] = {}
    try:
        for name, (cls, args, kw) in LAYER_CASES.items():
            ours, rng_ours = _build(layers, cls, args, kw, 123)
            theirs, rng_theirs = _build(fs_layers, cls, args, kw, 123)
            same[f"{name}: weight"] = torch.equal(ours.weight, theirs.weight)
            same[f"{name}: generator state after construction"] = torch.equal(rng_ours, rng_theirs)
            if getattr(theirs, "bias", None) is not None:
                same[f"{name}: bias (zeros)"] = torch.equal(ours.bias, theirs.bias)
            if kw.get("keep_master_weight_for_test"):
                same[f"{name}: master weight"] = torch.equal(ours.master_weight, theirs.master_weight)
            x, gy = _inputs(cls, args, kw, rank, world)
            got, want = _run(ours, x, gy), _run(theirs, x, gy)
            for what in want:
                errors[f"{name}: {what}"] = rel_err(got[what], want[what])
            if name == "column, gather_output":
                other, _ = _build(layers, cls, args, kw, 124)
                controls["another seed changes the weight"] = rel_err(other.weight, theirs.weight)
                with torch.no_grad():
                    if rank == 0:
                        ours.weight.mul_(1 + 1e-3)
                    controls["one shard scaled by 1+1e-3"] = rel_err(ours(x), want["output"])
        # The region mappings: forward and backward.
        g, local_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(50 + rank)
        full, local = torch.randn(B, 4 * world, generator=g), torch.randn(B, 4, generator=local_g)
        g_full, g_local = torch.randn(B, 4 * world, generator=g), torch.randn(B, 4, generator=local_g)
        for fn, x, gy in (
            ("copy_to_model_parallel_region", full, g_local.repeat(1, world)),
            ("reduce_from_model_parallel_region", local, g_full[:, :4]),
            ("scatter_to_model_parallel_region", full, g_local),
            ("gather_from_model_parallel_region", local, g_full),
        ):
            res = []
            for module in (mappings, fs_mappings):
                xx = x.clone().requires_grad_()
                arg = xx.clone()
                y = getattr(module, fn)(arg)
                y.backward(gy)
                res.append((y.detach(), xx.grad, torch.equal(arg, x)))
            errors[f"{fn}: output"] = rel_err(res[0][0], res[1][0])
            errors[f"{fn}: input grad"] = rel_err(res[0][1], res[1][1])
            same[f"{fn}: leaves its input as it was"] = res[0][2]  # fairscale's reduce writes into it
    finally:
        fs_initialize.destroy_model_parallel()
        initialize.destroy_model_parallel()
    return errors, same, controls


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_layers_and_mappings_match_fairscale(world):
    per_rank = run_ranks(world, _layers_vs_fairscale, timeout=120)
    failures = []
    for rank, (errors, same, controls) in enumerate(per_rank):
        failures += [f"rank {rank}: {k} rel err {v:.2e} > {LAYER_TOL}" for k, v in errors.items() if v > LAYER_TOL]
        failures += [f"rank {rank}: {k} differs from fairscale's" for k, v in same.items() if not v]
        failures += [
            f"rank {rank}: control {k!r} not seen ({v:.2e})" for k, v in controls.items() if v < 100 * LAYER_TOL
        ]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# Uneven sizes and nn.Embedding's options against a float64 dense reference


U_IN, U_OUT, U_VOCAB, U_DIM = 6, 11, 11, 7  # 11 over 4 ranks: 3, 3, 3, 2; 7: 2, 2, 2, 1


def _dense_linear(master: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, gy: torch.Tensor):
    w = master.double().requires_grad_()
    b = bias.double().requires_grad_()
    x64 = x.double().requires_grad_()
    y = F.linear(x64, w, b)
    y.backward(gy.double())
    return y.detach(), x64.grad, w.grad, b.grad


def _against_dense(rank: int, world: int) -> dict[str, float]:
    from tp_ffn.fairscale import initialize, layers

    initialize.initialize_model_parallel(world)
    err: dict[str, float] = {}
    try:
        torch.manual_seed(5)
        g = torch.Generator().manual_seed(6)
        # Column-parallel U_IN -> U_OUT, then row-parallel U_OUT -> U_IN: inputs, output gradients, biases.
        x, gy_out, bias_out = (torch.randn(*shape, generator=g) for shape in ((B, S, U_IN), (B, S, U_OUT), (U_OUT,)))
        x_out, gy_in, bias_in = (torch.randn(*shape, generator=g) for shape in ((B, S, U_OUT), (B, S, U_IN), (U_IN,)))
        for gather in (True, False):
            col = layers.ColumnParallelLinear(U_IN, U_OUT, gather_output=gather)
            s, e = col.start, col.end
            with torch.no_grad():
                col.bias.copy_(bias_out[s:e])
            y64, gx64, gw64, gb64 = _dense_linear(col.get_master_weight(), bias_out, x, gy_out)
            xx = x.clone().requires_grad_()
            y = col(xx)
            y.backward(gy_out if gather else gy_out[..., s:e])
            tag = f"column gather_output={gather}"
            err[f"{tag}: output"] = rel_err(y, y64 if gather else y64[..., s:e])
            err[f"{tag}: input grad"] = rel_err(xx.grad, gx64)
            err[f"{tag}: weight grad"] = rel_err(col.weight.grad, gw64[s:e])
            err[f"{tag}: bias grad"] = rel_err(col.bias.grad, gb64[s:e])
        for parallel in (False, True):
            row = layers.RowParallelLinear(U_OUT, U_IN, input_is_parallel=parallel)
            s, e = row.start, row.end
            with torch.no_grad():
                row.bias.copy_(bias_in)
            y64, gx64, gw64, gb64 = _dense_linear(row.get_master_weight(), bias_in, x_out, gy_in)
            xx = (x_out[..., s:e] if parallel else x_out).clone().requires_grad_()
            y = row(xx)
            y.backward(gy_in)
            tag = f"row input_is_parallel={parallel}"
            err[f"{tag}: output"] = rel_err(y, y64)
            err[f"{tag}: input grad"] = rel_err(xx.grad, gx64[..., s:e] if parallel else gx64)
            err[f"{tag}: weight grad"] = rel_err(row.weight.grad, gw64[:, s:e])
            err[f"{tag}: bias grad"] = rel_err(row.bias.grad, gb64)

        # Every id at least once, the padding id among them, some repeated (scale_grad_by_freq).
        ids = torch.cat([torch.arange(U_VOCAB), torch.randint(0, U_VOCAB, (13,), generator=g)]).reshape(2, 12)
        gy_emb = torch.randn(2, 12, U_DIM, generator=g)
        embedding_cases = [
            ("VocabParallelEmbedding", {"padding_idx": 3}),
            ("VocabParallelEmbedding", {"scale_grad_by_freq": True}),
            ("VocabParallelEmbedding", {"padding_idx": 9, "max_norm": 0.3, "scale_grad_by_freq": True}),
            ("ParallelEmbedding", {"padding_idx": -1}),
            ("ParallelEmbedding", {"max_norm": 0.3, "norm_type": 3.0, "scale_grad_by_freq": True}),
        ]
        for cls, kw in embedding_cases:
            emb = getattr(layers, cls)(U_VOCAB, U_DIM, **kw)
            dim, s, e = emb.shard_dim, emb.start, emb.end
            w64 = emb.get_master_weight().double().requires_grad_()
            pad = kw.get("padding_idx")
            dense_kw = {k: v for k, v in kw.items() if k != "padding_idx"}
            y64 = F.embedding(ids, w64, None if pad is None else pad % U_VOCAB, **dense_kw)
            y64.backward(gy_emb.double())
            y = emb(ids)
            y.backward(gy_emb)
            tag = f"{cls}({kw})"
            err[f"{tag}: output"] = rel_err(y, y64)
            err[f"{tag}: weight after forward (max_norm)"] = rel_err(emb.weight, w64.detach().narrow(dim, s, e - s))
            err[f"{tag}: weight grad"] = rel_err(emb.weight.grad, w64.grad.narrow(dim, s, e - s))
            for bad in (U_VOCAB, -1):
                try:
                    emb(torch.tensor([[0, bad]]))
                    err[f"{tag}: id {bad} refused"] = float("inf")
                except IndexError as ex:
                    err[f"{tag}: id {bad} refused"] = 0.0 if f"[0, {U_VOCAB})" in str(ex) else float("inf")
    finally:
        initialize.destroy_model_parallel()
    return err


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_uneven_sizes_and_embedding_options_match_dense_float64(world):
    failures = []
    for rank, err in enumerate(run_ranks(world, _against_dense, timeout=120)):
        failures += [f"rank {rank}: {k} rel err {v:.2e} > {DENSE_TOL}" for k, v in err.items() if not v <= DENSE_TOL]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# Default dtype and device, stride errors


def _defaults(rank: int, world: int) -> dict[str, str]:
    from tp_ffn.fairscale import initialize, layers

    def build() -> list[torch.nn.Module]:
        return [
            layers.ColumnParallelLinear(8, 8, gather_output=False),
            layers.RowParallelLinear(8, 8, input_is_parallel=True),
            layers.VocabParallelEmbedding(8, 4),
            layers.ParallelEmbedding(8, 4),
        ]

    def kinds(mods: list[torch.nn.Module]) -> str:
        return ",".join(sorted({f"{p.dtype}@{p.device.type}" for m in mods for p in m.parameters()}))

    initialize.initialize_model_parallel(world)
    seen: dict[str, str] = {}
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        seen["set_default_dtype(float64)"] = kinds(build())
        torch.set_default_dtype(default)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated, but Meta's loaders call it
            torch.set_default_tensor_type(torch.DoubleTensor)
            seen["set_default_tensor_type(DoubleTensor)"] = kinds(build())
            torch.set_default_tensor_type(torch.FloatTensor)
        state = torch.get_rng_state()
        with torch.device("meta"):
            seen["default device meta"] = kinds(build())
        torch.set_default_device("meta")  # as llama-models' generation.py sets its device
        try:
            seen["set_default_device(meta)"] = kinds(build())
        finally:
            torch.set_default_device(None)
        seen["meta device draws nothing"] = str(torch.equal(state, torch.get_rng_state()))
        seen["dtype=bfloat16 keyword"] = kinds([layers.ColumnParallelLinear(8, 8, dtype=torch.bfloat16)])
        try:
            layers.ColumnParallelLinear(8, 6, stride=2)  # blocks of 3 (W=2) or 2, 2, 1, 1 (W=4)
            seen["stride error"] = ""
        except ValueError as e:
            seen["stride error"] = str(e)
    finally:
        torch.set_default_dtype(default)
        initialize.destroy_model_parallel()
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_parameters_follow_default_dtype_and_device(world):
    for seen in run_ranks(world, _defaults, timeout=60):
        assert seen["set_default_dtype(float64)"] == "torch.float64@cpu"
        assert seen["set_default_tensor_type(DoubleTensor)"] == "torch.float64@cpu"
        assert seen["default device meta"] == seen["set_default_device(meta)"] == "torch.float32@meta"
        assert seen["meta device draws nothing"] == "True"
        assert seen["dtype=bfloat16 keyword"] == "torch.bfloat16@cpu"
        assert seen["stride error"].startswith("stride: 2 needs every rank's block to be the same size and divisible")


# --------------------------------------------------------------------------------------------------
# initialize: fairscale's groups, and clear errors


GRIDS = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (1, 2), (1, 4)]  # (model_parallel_size, pipeline_length) at W=4


def _describe(init: ModuleType) -> dict[str, object]:
    return {
        "model group": dist.get_process_group_ranks(init.get_model_parallel_group()),
        "data group": dist.get_process_group_ranks(init.get_data_parallel_group()),
        "pipeline group": dist.get_process_group_ranks(init.get_pipeline_parallel_group()),
        "pipeline ranks": list(init.get_pipeline_parallel_ranks()),
        "model rank/size/src": (
            init.get_model_parallel_rank(),
            init.get_model_parallel_world_size(),
            init.get_model_parallel_src_rank(),
        ),
        "data rank/size": (init.get_data_parallel_rank(), init.get_data_parallel_world_size()),
    }


def _layout(rank: int, world: int) -> tuple[list[tuple[dict, dict]], dict[str, str]]:
    from fairscale.nn.model_parallel import initialize as fs_initialize

    from tp_ffn.fairscale import initialize

    pairs = []
    printed = io.StringIO()
    for mp, pp in GRIDS:
        with contextlib.redirect_stdout(io.StringIO()):
            fs_initialize.initialize_model_parallel(mp, pp)
        with contextlib.redirect_stdout(printed):
            initialize.initialize_model_parallel(mp, pp, model_parallel_backend="gloo")
        pairs.append((_describe(initialize), _describe(fs_initialize)))
        fs_initialize.destroy_model_parallel()
        initialize.destroy_model_parallel()

    errors = {"printed": printed.getvalue()}

    def error_of(fn, *args) -> str:
        try:
            fn(*args)
        except (RuntimeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return ""

    errors["before"] = error_of(initialize.get_model_parallel_world_size)
    errors["initialized before"] = str(initialize.model_parallel_is_initialized())
    errors["not dividing"] = error_of(initialize.initialize_model_parallel, 3)
    errors["zero"] = error_of(initialize.initialize_model_parallel, 0)
    initialize.initialize_model_parallel(2)
    errors["initialized after"] = str(initialize.model_parallel_is_initialized())
    errors["twice"] = error_of(initialize.initialize_model_parallel, 2)
    initialize.destroy_model_parallel()
    initialize.initialize_model_parallel(model_parallel_size_=2)  # fairscale's keyword spelling
    errors["keyword mp size"] = str(initialize.get_model_parallel_world_size())
    initialize.destroy_model_parallel()
    return pairs, errors


@pytest.mark.timeout(240)
def test_initialize_groups_are_fairscales_and_misuse_is_refused():
    for rank, (pairs, errors) in enumerate(run_ranks(4, _layout, timeout=180)):
        for (mp, pp), (ours, theirs) in zip(GRIDS, pairs):
            assert ours == theirs, (rank, mp, pp)
        if rank == 1:  # spot-check the layout itself: model-parallel ranks are contiguous
            assert pairs[1][0]["model group"] == [0, 1] and pairs[1][0]["data group"] == [1, 3]
            assert pairs[4][0]["pipeline ranks"] == [1, 3] and pairs[4][0]["data group"] == [1]
        assert errors["printed"] == ""  # fairscale prints the sizes on rank 0
        assert errors["before"].startswith("RuntimeError: model parallel group is not initialized")
        assert errors["initialized before"] == "False" and errors["initialized after"] == "True"
        assert errors["not dividing"] == (
            "ValueError: initialize_model_parallel: the world size 4 is not divisible by model_parallel_size 3 "
            "x pipeline_length 1"
        )
        assert errors["zero"].startswith("ValueError: initialize_model_parallel: model_parallel_size: expected")
        assert errors["twice"].startswith("RuntimeError: initialize_model_parallel: model parallel is already")
        assert errors["keyword mp size"] == "2"


def test_fairscale_modules_not_provided():
    # fairscale's CUDA RNG tracker / activation checkpointing, vocab-parallel cross-entropy and utils.
    import tp_ffn.fairscale

    for name in ("random", "cross_entropy", "utils"):
        with pytest.raises(ModuleNotFoundError, match=f"No module named 'tp_ffn.fairscale.{name}'"):
            importlib.import_module(f"tp_ffn.fairscale.{name}")
    for name in ("get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "vocab_parallel_cross_entropy"):
        assert not hasattr(tp_ffn.fairscale, name)


def test_initialize_without_torch_distributed_says_so():
    from tp_ffn.fairscale import initialize

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised; call"):
        initialize.initialize_model_parallel(1)
    with pytest.raises(TypeError, match="expected the model-parallel size once"):
        initialize.initialize_model_parallel()
    with pytest.raises(TypeError, match="expected the model-parallel size once"):
        initialize.initialize_model_parallel(2, model_parallel_size_=2)
    with pytest.raises(RuntimeError, match="model parallel group is not initialized"):
        initialize.get_model_parallel_group()
    assert initialize.model_parallel_is_initialized() is False
