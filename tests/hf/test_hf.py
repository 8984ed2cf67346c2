"""tp_ffn.hf: Hugging Face MLPs made tensor-parallel in place, normal checkpoints out, this rank's slices in.

Everything is held against the dense transformers model (4.46.3, the test extra's pin) in float64 at world
sizes 1-4 with intermediate_size 37, which no world size from 2 to 4 divides. Tolerances: 1e-12 relative
in float64 (the only difference is the order of the sums across ranks); loading and gathering are bitwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from support.hf_models import INTERMEDIATE, build, tokens
from support.rankpool import run_ranks
from support.reference import rel_err

transformers = pytest.importorskip("transformers")
import tp_ffn.hf as tphf
from tp_ffn import shard_bounds
from tp_ffn.diagnostics import count_collectives

TOL = 1e-12
FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def _shards_ok(dense: torch.nn.Module, par: torch.nn.Module, rank: int, world: int) -> None:
    """Same keys in the same order; MLP entries hold this rank's rows / columns, the rest is untouched."""
    sd, sp = dense.state_dict(), par.state_dict()
    assert list(sd) == list(sp)
    s, e = shard_bounds(INTERMEDIATE, world, rank)
    for key, full in sd.items():
        if ".mlp.gate_proj." in key or ".mlp.up_proj." in key:
            assert torch.equal(sp[key], full[s:e]), key
        elif key.endswith(".mlp.down_proj.weight"):
            assert torch.equal(sp[key], full[:, s:e]), key
        else:
            assert torch.equal(sp[key], full), key


def _logits(rank: int, world: int) -> dict[str, float]:
    cases = {family: build(family) for family in FAMILIES}
    for act in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        cases[f"llama {act} bias"] = build("llama", hidden_act=act, mlp_bias=True)
    x = tokens()
    out = {}
    for name, dense in cases.items():
        par = copy.deepcopy(dense)
        assert tphf.parallelize_mlp(par) == 2
        assert isinstance(par.model.layers[1].mlp, tphf.ParallelMLP)
        _shards_ok(dense, par, rank, world)
        with torch.no_grad():
            out[name] = rel_err(par(x).logits, dense(x).logits)
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_logits_equal_dense_model(world):
    """Llama, Mistral, Qwen2, Gemma (gelu_pytorch_tanh via hidden_activation), and Llama with every supported
    activation and mlp_bias: the parallel model's logits are the dense model's at uneven splits."""
    for rank, errs in enumerate(run_ranks(world, _logits, timeout=180)):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


MODES = {1: {}, 2: {"fuse_gate_up": True}, 3: {"overlap_comm": True}, 4: {"overlap_comm": False, "comm_chunks": 2}}


def _train_step(rank: int, world: int) -> dict[str, float]:
    dense = build("llama", mlp_bias=True, tie_word_embeddings=True).train()
    par = copy.deepcopy(dense)
    tphf.parallelize_mlp(par, **MODES[world])
    x = tokens(seed=2)
    opts = {"lr": 1e-2, "weight_decay": 0.1}
    for model in (dense, par):
        model(x, labels=x).loss.backward()
    s, e = shard_bounds(INTERMEDIATE, world, rank)
    out = {}
    grads = dict(par.named_parameters())
    for name, p in dense.named_parameters():
        g = grads[name].grad
        assert g is not None, name
        want = p.grad
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            want = want[s:e]
        elif name.endswith(".mlp.down_proj.weight"):
            want = want[:, s:e]
        out[f"grad {name}"] = rel_err(g, want)
    for model in (dense, par):
        opt = torch.optim.AdamW(model.parameters(), **opts)
        opt.step()
    full, want = tphf.full_state_dict(par), dense.state_dict()
    out.update({f"after step {k}": rel_err(full[k], want[k]) for k in want})
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_training_step_equals_dense(world):
    """Every gradient (MLP shards against the dense gradient's rows / columns, replicated parameters
    against the whole) and every parameter after an AdamW step equal the dense model's; tied embeddings
    and biases included, a different execution mode at each world size."""
    for rank, errs in enumerate(run_ranks(world, _train_step, timeout=180)):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


def _save_gathered(rank: int, world: int, out_dir: str) -> dict[str, bool]:
    """full_state_dict on every rank, save_pretrained on rank 0, plain from_pretrained reads it back."""
    dense = build("llama", mlp_bias=True, tie_word_embeddings=True)
    par = copy.deepcopy(dense)
    tphf.parallelize_mlp(par)
    full = tphf.full_state_dict(par)
    want = dense.state_dict()
    same_gathered = list(full) == list(want) and all(torch.equal(full[k], want[k]) for k in want)
    if rank == 0:
        par.save_pretrained(out_dir, state_dict=full)
    dist.barrier()
    loaded = type(dense).from_pretrained(out_dir, torch_dtype=torch.float64)
    got = loaded.state_dict()
    same_loaded = list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        same_logits = torch.equal(loaded(tokens()).logits, dense(tokens()).logits)
    return {"gathered": same_gathered, "loaded": same_loaded, "logits": same_logits}


@pytest.mark.timeout(120)
def test_full_state_dict_saves_a_normal_checkpoint(tmp_path):
    """At W=3: full_state_dict is bitwise the dense state dict on every rank, and save_pretrained with it
    writes a checkpoint that transformers' own from_pretrained loads back bitwise (same logits)."""
    for rank, got in enumerate(run_ranks(3, _save_gathered, str(tmp_path / "ckpt"), timeout=100)):
        assert all(got.values()), f"rank {rank}: {got}"


def _bitwise_same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters / buffers (all of them, persistent or not) that differ in value, dtype or device."""
    bad = []
    for kind in ("named_parameters", "named_buffers"):
        ta, tb = dict(getattr(a, kind)(remove_duplicate=False)), dict(getattr(b, kind)(remove_duplicate=False))
        if list(ta) != list(tb):
            bad.append(f"{kind}: {sorted(set(ta) ^ set(tb))}")
            continue
        bad += [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return bad


def _load_slices(rank: int, world: int, checkpoints: dict[str, tuple[str, dict]]) -> dict[str, object]:
    out: dict[str, object] = {}
    x = tokens()
    for name, (path, kwargs) in checkpoints.items():
        model_class = getattr(transformers, name.split()[0])
        ours = tphf.from_pretrained(model_class, path, **kwargs)
        ref = model_class.from_pretrained(path, **kwargs)
        tphf.parallelize_mlp(ref)
        out[f"{name} differ"] = _bitwise_same(ours, ref)
        with torch.no_grad():
            out[f"{name} logits"] = torch.equal(ours(x).logits, ref(x).logits)
        out[f"{name} eval"] = not ours.training
        out[f"{name} ties"] = (ours.lm_head.weight is ours.model.embed_tokens.weight) == ref.config.tie_word_embeddings
        out[f"{name} generation config"] = ours.generation_config.to_dict() == ref.generation_config.to_dict()
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A sharded (index.json) tied bf16 Llama with biases, a single-file float32 Gemma (tied,
    hidden_activation) and an untied Qwen2 saved in float16."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for family, dtype, kwargs, save in (
        ("llama", torch.bfloat16, {"mlp_bias": True, "tie_word_embeddings": True}, {"max_shard_size": "20KB"}),
        ("gemma", torch.float32, {}, {}),
        ("qwen2", torch.float16, {}, {}),
    ):
        path = root / family
        build(family, dtype=dtype, **kwargs).save_pretrained(path, **save)
        made[family] = str(path)
    return made


@pytest.mark.timeout(150)
def test_from_pretrained_equals_load_then_parallelize(checkpoints):
    """At W=3, every parameter and buffer (rotary inv_freq included) of tp_ffn.hf.from_pretrained is bitwise
    those of transformers' from_pretrained followed by parallelize_mlp, as are the logits, with the
    checkpoint sharded over several files, tied embeddings, and torch_dtype given, 'auto' or left out."""
    names = sorted(os.listdir(checkpoints["llama"]))
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) >= 2
    cases = {
        "LlamaForCausalLM bf16": (checkpoints["llama"], {"torch_dtype": torch.bfloat16}),
        "LlamaForCausalLM default": (checkpoints["llama"], {}),
        "GemmaForCausalLM auto": (checkpoints["gemma"], {"torch_dtype": "auto"}),
        "Qwen2ForCausalLM float32 eager": (
            checkpoints["qwen2"],
            {"torch_dtype": torch.float32, "attn_implementation": "eager"},
        ),
    }
    for rank, got in enumerate(run_ranks(3, _load_slices, cases, timeout=130)):
        bad = {k: v for k, v in got.items() if v is not True and v != []}
        assert not bad, f"rank {rank}: {bad}"


def _new_head(rank: int, world: int, path: str) -> dict[str, object]:
    import warnings

    cls = transformers.Qwen2ForSequenceClassification
    torch.manual_seed(rank)  # generators differ across ranks (e.g. seeded per data-parallel rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tphf.from_pretrained(cls, path, torch_dtype=torch.float32, num_labels=3)
    ref = cls.from_pretrained(path, torch_dtype=torch.float32, num_labels=3)
    tphf.parallelize_mlp(ref)
    score = ours.score.weight.detach()
    gathered = [torch.empty_like(score) for _ in range(world)]
    dist.all_gather(gathered, score)
    mine, theirs = dict(ours.named_parameters()), dict(ref.named_parameters())
    return {
        "warned": any("newly initialized: ['score.weight']" in str(w.message) for w in caught),
        "same head on every rank": all(torch.equal(g, score) for g in gathered),
        "head drawn by _init_weights": 0.5 < score.std().item() / ours.config.initializer_range < 1.5,
        "the rest loaded": all(torch.equal(v, theirs[k]) for k, v in mine.items() if k != "score.weight"),
        "runs": tuple(ours(tokens(batch=1)).logits.shape) == (1, 3),
    }


@pytest.mark.timeout(120)
def test_from_pretrained_initialises_a_new_head(checkpoints):
    """As transformers does, a head the checkpoint lacks (a sequence-classification head on a causal-LM
    checkpoint) is drawn by the model's _init_weights with a warning, here the same on every rank (the head is
    replicated); every other tensor is loaded as transformers loads it. A missing MLP weight stays an error
    (test_from_pretrained_errors)."""
    for rank, got in enumerate(run_ranks(2, _new_head, checkpoints["qwen2"], timeout=100)):
        assert all(got.values()), (rank, got)


def _deepcopied(rank: int, world: int) -> dict[str, object]:
    """A parallelized model deep-copied the way TRL's reference models, EMA and AveragedModel copy it."""
    par = build("llama", mlp_bias=True).train()
    tphf.parallelize_mlp(par)
    twin = copy.deepcopy(par)
    mlp, twin_mlp = par.model.layers[0].mlp, twin.model.layers[0].mlp
    x = tokens()
    with torch.no_grad():
        same_logits = torch.equal(twin(x).logits, par(x).logits)
    before = {k: v.clone() for k, v in par.state_dict().items()}
    twin(x, labels=x).loss.backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    return {
        "same logits": same_logits,
        "same group": twin_mlp.tp.group is mlp.tp.group,
        "own parameters": twin_mlp.gate_proj.weight is not mlp.gate_proj.weight,
        "original untouched": all(torch.equal(v, before[k]) for k, v in par.state_dict().items()),
        "copy trained": not torch.equal(twin_mlp.down_proj.weight, mlp.down_proj.weight),
    }


@pytest.mark.timeout(120)
def test_deepcopy_of_a_parallelized_model():
    """At W=2 a parallelized model deep-copies (a ProcessGroup cannot be pickled: the copy shares the group) into
    an independent model with the same logits, whose training leaves the original as it was."""
    for rank, got in enumerate(run_ranks(2, _deepcopied, timeout=100)):
        assert all(got.values()), (rank, got)


def _collectives(rank: int, world: int) -> dict[str, dict[str, int]]:
    """All-reduces in forward and backward of one MLP: tp_ffn's block against Hugging Face's tp_plan for
    the MLP (gate_proj and up_proj "colwise", down_proj "rowwise", as in LlamaConfig.base_model_tp_plan
    of transformers >= 4.47), applied with the PyTorch styles those strings stand for."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dense = build("llama", dtype=torch.float32, intermediate_size=36)  # DTensor's plan needs an even split
    ours = copy.deepcopy(dense)
    tphf.parallelize_mlp(ours)
    hf_plan = copy.deepcopy(dense)
    mesh = init_device_mesh("cpu", (world,))
    for layer in hf_plan.model.layers:
        parallelize_module(
            layer.mlp,
            mesh,
            {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()},
        )
    x = torch.randn(2, 5, 32)
    out = {}
    for name, model in (("tp_ffn", ours), ("hf_plan", hf_plan)):
        xi = x.clone().requires_grad_()
        with count_collectives() as fwd:
            y = model.model.layers[0].mlp(xi)
        with count_collectives() as bwd:
            y.sum().backward()
        with count_collectives() as whole:
            model(tokens(), labels=tokens()).loss.backward()
        out[name] = {"forward": fwd["all_reduce"], "backward": bwd["all_reduce"], "model": dict(whole)}
    # MLPs already sharded by such a plan are refused, and the model is left as it was.
    try:
        tphf.parallelize_mlp(hf_plan)
    except ValueError as e:
        out["refused"] = "got a DTensor" in str(e) and not any(
            isinstance(m, tphf.ParallelMLP) for m in hf_plan.modules()
        )
    return out


@pytest.mark.timeout(120)
def test_one_backward_all_reduce_per_mlp():
    """Per MLP, tp_ffn: one all-reduce forward, one backward; Hugging Face's plan: one forward, two backward
    (gate_proj and up_proj each all-reduce their input gradient). A whole training step of the two-layer
    model does 2 + 2 all-reduces with tp_ffn and nothing else."""
    for rank, got in enumerate(run_ranks(2, _collectives, timeout=100)):
        assert got["tp_ffn"]["forward"] == 1 and got["tp_ffn"]["backward"] == 1, (rank, got)
        assert got["hf_plan"]["forward"] == 1 and got["hf_plan"]["backward"] == 2, (rank, got)
        assert got["tp_ffn"]["model"] == {"all_reduce": 4}, (rank, got)
        assert got["hf_plan"]["model"] == {"all_reduce": 6}, (rank, got)
        assert got["refused"] is True, (rank, got)


def _compiled(rank: int, world: int) -> dict[str, object]:
    import torch._dynamo as dynamo

    out: dict[str, object] = {}
    for options in ({}, {"fuse_gate_up": True}, {"comm_chunks": 2}):
        model = build("llama", mlp_bias=True)
        tphf.parallelize_mlp(model, **options)
        mlp = model.model.layers[0].mlp.train()
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        dynamo.reset()
        explained = dynamo.explain(mlp)(x)
        out[f"{options} graphs, breaks"] = (explained.graph_count, explained.graph_break_count)
        compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        mlp(xe).sum().backward()
        eager = [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad()
        yc = compiled(xc)
        yc.sum().backward()
        out[f"{options} output"] = rel_err(yc, mlp(x))
        out[f"{options} input grad"] = rel_err(xc.grad, xe.grad)
        out[f"{options} weight grads"] = max(rel_err(p.grad, g) for p, g in zip(mlp.parameters(), eager))
    return out


@pytest.mark.timeout(200)
def test_compile_does_not_break_on_the_mlp():
    """At W=2, dynamo traces the replaced block in one graph with no break in every execution mode, and the
    compiled block (fullgraph, aot_eager) gives the eager block's output and gradients."""
    for rank, got in enumerate(run_ranks(2, _compiled, timeout=180)):
        for key, value in got.items():
            if key.endswith("breaks"):
                assert value == (1, 0), (rank, key, value)
            else:
                assert value < TOL, (rank, key, value)


# Single-process checks (world of one, no process group).


@pytest.mark.slow
def test_import_tp_ffn_does_not_import_transformers():
    """The core imports no adapter (tp_ffn.hf, tp_ffn.fairscale); tp_ffn.hf imports neither transformers nor
    accelerate until from_pretrained runs."""
    code = (
        "import sys, tp_ffn; print(sorted(m for m in sys.modules if m.startswith(('tp_ffn.hf', 'tp_ffn.fairscale'))))\n"
        "import tp_ffn.hf; print('transformers' in sys.modules, 'accelerate' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False", "False"], out


def test_activation_errors():
    with pytest.raises(ValueError, match=r"config.hidden_act: .*got 'gelu_new'"):
        tphf.parallelize_mlp(build("llama", hidden_act="gelu_new"))
    # transformers 4's Gemma computes hidden_activation (5's computes hidden_act, and so does tp_ffn there).
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match=r"config.hidden_activation: .*got 'quick_gelu'"):
            tphf.parallelize_mlp(build("gemma", hidden_activation="quick_gelu"))
        gemma = build("gemma", hidden_activation="relu", hidden_act="gelu")
        tphf.parallelize_mlp(gemma)
        assert gemma.model.layers[0].mlp.activation == "relu"
    # An act_fn that is not what the config says (here exact gelu where the config says tanh gelu).
    model = build("llama", hidden_act="gelu_pytorch_tanh")
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.act_fn: computes something other than"):
        tphf.parallelize_mlp(model)
    assert isinstance(model.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)  # untouched


def test_any_module_with_the_same_mlp():
    """No config: the activation is read off act_fn; the block is replaced wherever it sits."""
    from transformers.activations import ACT2FN

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 11), torch.nn.Linear(8, 11)
            self.down_proj = torch.nn.Linear(11, 8)
            self.act_fn = ACT2FN["gelu"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    dense = torch.nn.Sequential(MLP(), torch.nn.ReLU(), MLP()).double()
    par = copy.deepcopy(dense)
    assert tphf.parallelize_mlp(par) == 2 and tphf.parallelize_mlp(par) == 0
    assert par[0].activation == "gelu"
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(par(x), dense(x))  # one rank: the same GEMMs
    with pytest.raises(ValueError, match="is itself such an MLP"):
        tphf.parallelize_mlp(MLP())


def test_bad_mlps_are_left_as_they_were():
    model = build("llama")
    mlp = model.model.layers[1].mlp
    mlp.down_proj = torch.nn.Linear(INTERMEDIATE, 32, bias=True, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp: expected biases on all of gate_proj/up_proj/down_proj"):
        tphf.parallelize_mlp(model)
    mlp.down_proj = torch.nn.Linear(INTERMEDIATE + 1, 32, bias=False)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight: expected shape \(32, 37\)"):
        tphf.parallelize_mlp(model)
    assert not any(isinstance(m, tphf.ParallelMLP) for m in model.modules())


def test_kept_names_grad_flags_and_mode():
    model = build("llama", mlp_bias=True).train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    tphf.parallelize_mlp(model)
    assert [n for n, _ in model.named_parameters()] == names
    mlp = model.model.layers[0].mlp
    assert mlp.training and mlp.config is model.config
    assert not mlp.up_proj.weight.requires_grad and mlp.gate_proj.weight.requires_grad
    assert mlp.w1 is mlp.gate_proj and mlp.w3 is mlp.up_proj and mlp.w2 is mlp.down_proj


# transformers >= 4.47 keeps the model's tensor-parallel plan in `_tp_plan` (LlamaConfig.base_model_tp_plan).
LLAMA_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


def test_tp_plan_rules_for_the_replaced_mlps_are_dropped():
    model = build("llama")
    model.model._tp_plan = dict(LLAMA_TP_PLAN)
    model._tp_plan = {f"model.{k}": v for k, v in LLAMA_TP_PLAN.items()} | {"lm_head": "colwise_rep"}
    tphf.parallelize_mlp(model)
    attention = {k: v for k, v in LLAMA_TP_PLAN.items() if ".mlp." not in k}
    assert model.model._tp_plan == attention
    assert model._tp_plan == {f"model.{k}": v for k, v in attention.items()} | {"lm_head": "colwise_rep"}


def test_from_pretrained_errors(checkpoints, tmp_path):
    cls = transformers.LlamaForCausalLM
    path = checkpoints["llama"]
    for kwargs, match in (
        ({"tp_plan": "auto"}, r"tp_plan: not supported by tp_ffn.hf.from_pretrained"),
        ({"device_map": "auto"}, r"device_map: expected one device"),
        ({"device_map": {"model": "cpu", "lm_head": "cpu"}}, r"device_map: expected one device"),
        ({"torch_dtype": "float7"}, r"dtype: expected a torch.dtype"),
        ({"trust_remote_code": True}, r"trust_remote_code: expected False"),
    ):
        with pytest.raises(ValueError, match=match):
            tphf.from_pretrained(cls, path, **kwargs)
    # accelerate's / TRL's spelling of one device for the whole model: {"": device}.
    assert tphf.from_pretrained(cls, path, device_map={"": "cpu"}).lm_head.weight.device == torch.device("cpu")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['not_an_option'\]"):
        tphf.from_pretrained(cls, path, not_an_option=1)
    with pytest.raises(ValueError, match=r"path: expected a local checkpoint directory"):
        tphf.from_pretrained(cls, tmp_path / "nothing")
    # A checkpoint missing a tensor, and one with a wrong shape.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((__import__("pathlib").Path(checkpoints["gemma"]) / "config.json").read_text())
    tensors = load_file(os.path.join(checkpoints["gemma"], "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 MLP weights of the model: \['model.layers.1.mlp.up_proj.weight'\]"):
        tphf.from_pretrained(transformers.GemmaForCausalLM, bad)
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.down_proj.weight: expected shape \(32, 37\), got \(32, 36\)"
    ):
        tphf.from_pretrained(transformers.GemmaForCausalLM, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"expected model.safetensors or model.safetensors.index.json"):
        tphf.from_pretrained(transformers.GemmaForCausalLM, bad)


def test_from_pretrained_auto_class_and_base_model(checkpoints):
    """An Auto class resolves through the config; a base model loads from a causal-LM checkpoint (the
    'model.' prefix is dropped and lm_head is reported as not loaded), as transformers does it."""
    auto = tphf.from_pretrained(transformers.AutoModelForCausalLM, checkpoints["qwen2"])
    assert type(auto) is transformers.Qwen2ForCausalLM
    with pytest.warns(UserWarning, match=r"no place for were not loaded: \['lm_head.weight'\]"):
        base = tphf.from_pretrained(transformers.Qwen2Model, checkpoints["qwen2"])
    ref = transformers.Qwen2Model.from_pretrained(checkpoints["qwen2"])
    tphf.parallelize_mlp(ref)
    assert _bitwise_same(base, ref) == []
    # Config overrides go to the config, as with transformers; a config object is taken as it is.
    longer = tphf.from_pretrained(transformers.Qwen2ForCausalLM, checkpoints["qwen2"], max_position_embeddings=128)
    assert longer.config.max_position_embeddings == 128
    config = transformers.Qwen2Config.from_pretrained(checkpoints["qwen2"], rms_norm_eps=1e-3)
    given = tphf.from_pretrained(transformers.Qwen2ForCausalLM, checkpoints["qwen2"], config=config)
    assert given.config.rms_norm_eps == 1e-3
