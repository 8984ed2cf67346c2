"""tp_ffn.hf on Hugging Face mixture-of-experts models: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Runs with the venv's transformers 4.46.3 (experts as modules; Qwen3-MoE is not in it) and, through
tests/hf/test_transformers5.py, with transformers 5 (experts fused in ``gate_up_proj`` / ``down_proj``). Every MoE layer
becomes one ParallelSparseMoeBlock, held against the unparallelized HF model in float64 at W=2 and 3 with expert
size 37 and shared-expert size 23 (19+18 / 13+12+12 and 12+11 / 8+8+7 rows per rank). Tolerance 1e-12 relative:
the routing is the model's own router on the same inputs, so the only differences are the order of the sums
(across ranks, and over a token's k experts instead of expert by expert).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.rankpool import run_ranks
from support.reference import rel_err

transformers = pytest.importorskip("transformers")
import tp_ffn.hf as tphf
from tp_ffn import shard_bounds
from tp_ffn.diagnostics import count_collectives
from tp_ffn.hf.moe import ParallelSparseMoeBlock

TF5 = int(transformers.__version__.split(".")[0]) >= 5
TOL = 1e-12
VOCAB, E, K, EXPERT, SHARED, DENSE = 64, 4, 2, 37, 23, 40
FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe") if TF5 else ("mixtral", "qwen2_moe", "olmoe")
# name -> (family, config overrides); Qwen2-MoE's layer 1 dense (mlp_only_layers): one ParallelMLP beside the block.
CASES = {f: (f, {}) for f in FAMILIES} | {"qwen2_moe dense layer 1": ("qwen2_moe", {"mlp_only_layers": [1]})}
# The HF names of an expert's gate / up / down projections (transformers 4) by family.
PROJECTIONS = {"mixtral": ("w1", "w3", "w2")} | {f: ("gate_proj", "up_proj", "down_proj") for f in FAMILIES[1:]}


def tiny_moe(family: str, **overrides) -> tuple[type, object]:
    """``(model class, config)``: two layers, hidden 32, 4 experts of size 37, top-2, aux-loss weight 0.1."""
    tf = transformers
    common = {
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": K, "router_aux_loss_coef": 0.1,
    }  # fmt: skip
    if TF5:  # HF's default grouped_mm needs 16-byte strides, which 37 float32 columns are not
        common["experts_implementation"] = "eager"
    classes = {
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig, {"num_local_experts": E, "intermediate_size": EXPERT}),
        "qwen2_moe": (
            tf.Qwen2MoeForCausalLM,
            tf.Qwen2MoeConfig,
            {
                "num_experts": E,
                "moe_intermediate_size": EXPERT,
                "shared_expert_intermediate_size": SHARED,
                "intermediate_size": DENSE,
            },
        ),
        "olmoe": (
            tf.OlmoeForCausalLM,
            tf.OlmoeConfig,
            {"num_experts": E, "intermediate_size": EXPERT, "norm_topk_prob": True},
        ),
    }
    if TF5:
        classes["qwen3_moe"] = (
            tf.Qwen3MoeForCausalLM,
            tf.Qwen3MoeConfig,
            {"num_experts": E, "moe_intermediate_size": EXPERT, "intermediate_size": DENSE, "head_dim": 8},
        )
    model_class, config_class, extra = classes[family]
    return model_class, config_class(**{**common, **extra, **overrides})


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> torch.nn.Module:
    model_class, config = tiny_moe(family, **overrides)
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():  # transformers 5 starts the routers at zero: draw them, so routing depends on the tokens
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == E:
                p.normal_(0, 0.5)
    return model


def tokens(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def expected_shard(name: str, full: torch.Tensor, rank: int, world: int) -> tuple[str, torch.Tensor]:
    """``(the parallel model's parameter name, this rank's part of the dense tensor)``, from the HF layouts:
    experts per module (transformers 4) or fused (5: gate rows, then up rows), a ParallelMLP's rows / columns."""
    block, sep, rest = name.partition(".experts.")
    if sep and rest == "gate_up_proj":  # [E, 2I, H]
        size = full.shape[1] // 2
        s, e = shard_bounds(size, world, rank)
        return f"{block}.experts.w1|w3", torch.stack((full[:, s:e], full[:, size + s : size + e]))
    if sep and rest == "down_proj":  # [E, H, I]
        s, e = shard_bounds(full.shape[2], world, rank)
        return f"{block}.experts.w2", full[:, :, s:e]
    if sep:  # experts.{e}.{proj}.weight
        index, proj, _ = rest.split(".")
        ours = {"w1": "w1", "w3": "w3", "w2": "w2", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        s, e = shard_bounds(full.shape[1] if ours == "w2" else full.shape[0], world, rank)
        return f"{block}.experts.{ours}[{index}]", (full[:, s:e] if ours == "w2" else full[s:e])
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        s, e = shard_bounds(full.shape[0], world, rank)
        return name, full[s:e]
    if name.endswith("down_proj.weight"):
        s, e = shard_bounds(full.shape[1], world, rank)
        return name, full[:, s:e]
    return name, full


def parallel_grad(par: torch.nn.Module, name: str) -> torch.Tensor:
    """The gradient ``expected_shard`` names (``...experts.w1[3]``, ``...experts.w1|w3`` stacked)."""
    if "|" in name:
        base, _, _ = name.rpartition(".")
        return torch.stack((par.get_parameter(f"{base}.w1").grad, par.get_parameter(f"{base}.w3").grad))
    if name.endswith("]"):
        base, _, index = name[:-1].partition("[")
        return par.get_parameter(base).grad[int(index)]
    return par.get_parameter(name).grad


def _train_step(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    x = tokens()
    for name, (family, overrides) in CASES.items():
        dense = build(family, **overrides).train()
        par = copy.deepcopy(dense)
        replaced = tphf.parallelize_mlp(par)
        blocks = [m for m in par.modules() if isinstance(m, ParallelSparseMoeBlock)]
        mlps = [
            m for m in par.modules() if isinstance(m, tphf.ParallelMLP) and m not in [b.shared_expert for b in blocks]
        ]
        out[f"{name} replaced (count, MoE blocks, MLPs)"] = (replaced, len(blocks), len(mlps))
        want, got = (m(x, labels=x, output_router_logits=True) for m in (dense, par))
        out[f"{name} aux loss > 0"] = want.aux_loss.item() > 0 and len(got.router_logits) == len(want.router_logits)
        out[f"{name} logits"] = rel_err(got.logits, want.logits)
        out[f"{name} loss (with aux)"] = rel_err(got.loss, want.loss)
        out[f"{name} aux loss"] = rel_err(got.aux_loss, want.aux_loss)
        out[f"{name} router logits"] = max(rel_err(a, b) for a, b in zip(got.router_logits, want.router_logits))
        want.loss.backward()
        got.loss.backward()
        worst = 0.0
        for pname, p in dense.named_parameters():
            ours, part = expected_shard(pname, p.grad, rank, world)
            worst = max(worst, rel_err(parallel_grad(par, ours), part))
        out[f"{name} gradients"] = worst
        for model in (dense, par):
            torch.optim.SGD(model.parameters(), lr=0.1).step()
        full, sd = tphf.full_state_dict(par), dense.state_dict()
        out[f"{name} full_state_dict keys"] = list(full) == list(sd)
        out[f"{name} after SGD step"] = max(rel_err(full[k], v) for k, v in sd.items())
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_logits_aux_loss_and_training_step_equal_dense(world):
    """Every family (and Qwen2-MoE with a dense layer): one ParallelSparseMoeBlock per MoE layer (a ParallelMLP per
    dense MLP); logits, router logits, HF's auxiliary loss (output_router_logits=True, in the loss), every gradient
    (experts' and the shared expert's shards, the replicated router and the rest) and the parameters after an SGD
    step equal the dense model's; full_state_dict has the model's own keys in its order."""
    moe_layers = {"qwen2_moe dense layer 1": (2, 1, 1)}
    for rank, got in enumerate(run_ranks(world, _train_step, timeout=180)):
        for key, value in got.items():
            if key.endswith("(count, MoE blocks, MLPs)"):
                assert value == moe_layers.get(key.split(" replaced")[0], (2, 2, 0)), (world, rank, key, value)
            elif isinstance(value, bool):
                assert value, (world, rank, key)
            else:
                assert value < TOL, (world, rank, key, value)


def _per_expert(model: torch.nn.Module) -> None:
    """What tp_ffn.hf did before MoE blocks (transformers 4): every expert and the shared expert a ParallelMLP."""
    for layer in model.model.layers:
        tphf.parallelize_mlp(layer.mlp.experts)
        holder = torch.nn.Module()
        holder.shared_expert = layer.mlp.shared_expert
        tphf.parallelize_mlp(holder)
        layer.mlp.shared_expert = holder.shared_expert


def _collectives(rank: int, world: int) -> dict[str, tuple[dict, dict]]:
    dense = build("qwen2_moe", dtype=torch.float32).train()
    models = {"block": copy.deepcopy(dense)}
    tphf.parallelize_mlp(models["block"])
    if not TF5:  # transformers 5 fuses the experts: there is no per-expert form to compare with
        models["per expert"] = copy.deepcopy(dense)
        _per_expert(models["per expert"])
    x = tokens()
    out = {}
    for name, model in models.items():
        with count_collectives() as fwd:
            loss = model(x, labels=x, output_router_logits=True).loss
        with count_collectives() as bwd:
            loss.backward()
        out[name] = (dict(fwd), dict(bwd))
    return out


@pytest.mark.timeout(120)
def test_collectives_per_step():
    """Qwen2-MoE, 4 experts + shared expert, 2 layers, W=2, a training step with the auxiliary loss: one
    all-reduce forward per layer; backward one of the input gradient and one of the [T, k+1] routing weights
    per layer (docs/moe.md). Every expert parallelized on its own (what tp_ffn.hf did before): 10 and 10."""
    for rank, got in enumerate(run_ranks(2, _collectives, timeout=100)):
        assert got["block"] == ({"all_reduce": 2}, {"all_reduce": 4}), (rank, got)
        if not TF5:
            assert got["per expert"] == ({"all_reduce": 10}, {"all_reduce": 10}), (rank, got)


def _save_reload(rank: int, world: int, root: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for family in FAMILIES:
        dense = build(family)
        par = copy.deepcopy(dense)
        tphf.parallelize_mlp(par)
        full, want = tphf.full_state_dict(par), dense.state_dict()
        out[f"{family} gathered"] = list(full) == list(want) and all(torch.equal(full[k], v) for k, v in want.items())
        path = os.path.join(root, family)
        if rank == 0:
            par.save_pretrained(path, state_dict=full)
        dist.barrier()
        kwargs = {"experts_implementation": "eager"} if TF5 else {}
        loaded = type(dense).from_pretrained(path, torch_dtype=torch.float64, **kwargs)
        got = loaded.state_dict()
        out[f"{family} reloaded"] = list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())
        dist.barrier()
    return out


@pytest.mark.timeout(150)
def test_full_state_dict_saves_the_models_own_checkpoint(tmp_path):
    """At W=3, full_state_dict is bitwise the dense state dict (per-expert keys in transformers 4, fused in 5, in
    the model's order), and save_pretrained with it writes what transformers' from_pretrained loads back bitwise."""
    for rank, got in enumerate(run_ranks(3, _save_reload, str(tmp_path), timeout=130)):
        assert all(got.values()), (rank, got)


# --- from_pretrained --------------------------------------------------------------------------------------------


def _fused_copy(src: Path, dst: Path) -> None:
    """The checkpoint at ``src`` with every layer's experts stored fused (``experts.gate_up_proj [E, 2I, H]``, gate
    rows first; ``experts.down_proj [E, H, I]``), as some checkpoints keep them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        block, sep, rest = key.partition(".experts.")
        if not sep:
            fused[key] = tensors[key]
            continue
        e, proj, _ = rest.split(".")
        if e != "0":
            continue
        gate, up, down = next(p for p in PROJECTIONS.values() if proj in p)
        stack = {
            n: torch.stack([tensors[f"{block}.experts.{i}.{n}.weight"] for i in range(E)]) for n in (gate, up, down)
        }
        fused[f"{block}.experts.gate_up_proj"] = torch.cat((stack[gate], stack[up]), dim=1)
        fused[f"{block}.experts.down_proj"] = stack[down]
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(fused, str(dst / "model.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Each family saved by transformers' save_pretrained (experts one tensor each, as on the hub; transformers 5
    saves them so too), Mixtral sharded over several files in bfloat16, and OLMoE again with fused experts."""
    root = tmp_path_factory.mktemp("hf_moe")
    made = {}
    for family in FAMILIES:
        path = root / family
        dtype = torch.bfloat16 if family == "mixtral" else torch.float32
        save = {"max_shard_size": "20KB"} if family == "mixtral" else {}
        build(family, dtype=dtype).save_pretrained(path, **save)
        made[family] = str(path)
    _fused_copy(root / "olmoe", root / "olmoe fused")
    made["olmoe fused"] = str(root / "olmoe fused")
    return made


def _bitwise_diff(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    bad = []
    for kind in ("named_parameters", "named_buffers"):
        ta, tb = dict(getattr(a, kind)()), dict(getattr(b, kind)())
        if list(ta) != list(tb):
            return [f"{kind}: {sorted(set(ta) ^ set(tb))}"]
        bad += [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return bad


def _load(rank: int, world: int, checkpoints: dict[str, str]) -> dict[str, object]:
    from tp_ffn.safetensors_dir import SafetensorsDir

    read = []
    real_read = SafetensorsDir.read_many  # read_into goes through it too

    def counting(files, reads):  # records what this rank asks safetensors for
        reads = list(reads)
        for key, out, _ in reads:
            read.append((key, sum(t.numel() for t in ([out] if isinstance(out, torch.Tensor) else out))))
        return real_read(files, reads)

    SafetensorsDir.read_many = counting
    out: dict[str, object] = {}
    x = tokens()
    try:
        for name, path in checkpoints.items():
            family = name.split()[0]
            model_class, _ = tiny_moe(family)
            read.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # every tensor placed: no "newly initialized", no "not loaded"
                ours = tphf.from_pretrained(model_class, path, torch_dtype=torch.float32)
            ref = model_class.from_pretrained(
                checkpoints[family], torch_dtype=torch.float32, **({"experts_implementation": "eager"} if TF5 else {})
            )
            tphf.parallelize_mlp(ref)
            out[f"{name} differ"] = _bitwise_diff(ours, ref)
            with torch.no_grad():
                out[f"{name} logits"] = torch.equal(ours(x).logits, ref(x).logits)
            s, e = shard_bounds(EXPERT, world, rank)
            experts = sum(n for key, n in read if ".experts." in key)
            out[f"{name} expert elements read"] = (experts, 2 * E * 3 * (e - s) * 32)
    finally:
        SafetensorsDir.read_many = real_read
    return out


@pytest.mark.timeout(200)
def test_from_pretrained_loads_every_expert(checkpoints):
    """At W=3, tp_ffn.hf.from_pretrained gives bitwise the model of transformers' from_pretrained followed by
    parallelize_mlp (every expert loaded: transformers 5 converts the per-expert keys on disk while loading, and
    tp_ffn.hf reads them as they are), with a sharded bfloat16 Mixtral (block_sparse_moe on disk, mlp in
    transformers 5), and from fused experts on disk. Each rank reads its rows of every expert and no more."""
    for rank, got in enumerate(run_ranks(3, _load, checkpoints, timeout=180)):
        for key, value in got.items():
            if key.endswith("elements read"):
                assert value[0] == value[1], (rank, key, value)
            else:
                assert value is True or value == [], (rank, key, value)


def test_from_pretrained_checkpoint_errors(checkpoints, tmp_path):
    """A checkpoint tensor that matches nothing, a missing expert and a wrong expert shape are errors naming them."""
    from safetensors.torch import load_file, save_file

    src = Path(checkpoints["olmoe"])
    model_class, _ = tiny_moe("olmoe")
    tensors = load_file(str(src / "model.safetensors"))

    def write(ts: dict[str, torch.Tensor]) -> Path:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        (bad / "config.json").write_text((src / "config.json").read_text())
        save_file(ts, str(bad / "model.safetensors"))
        return bad

    extra = dict(tensors, **{"model.layers.0.mlp.experts.4.gate_proj.weight": torch.zeros(EXPERT, 32)})
    with pytest.raises(
        ValueError, match=r"1 checkpoint tensors match nothing .*'model.layers.0.mlp.experts.4.gate_proj"
    ):
        tphf.from_pretrained(model_class, write(extra))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors of model.layers.1.mlp: .*experts.2.up_proj"):
        tphf.from_pretrained(model_class, write(missing))
    short = dict(tensors, **{"model.layers.0.mlp.experts.3.down_proj.weight": torch.zeros(32, EXPERT - 1)})
    with pytest.raises(ValueError, match=r"experts.3.down_proj.weight: expected shape \(32, 37\), got \(32, 36\)"):
        tphf.from_pretrained(model_class, write(short))
    no_experts = {k: v for k, v in tensors.items() if "layers.0.mlp.experts." not in k}
    with pytest.raises(ValueError, match=r"lacks the experts of model.layers.0.mlp"):
        tphf.from_pretrained(model_class, write(no_experts))


# --- what is refused ---------------------------------------------------------------------------------------------


class _OtherMoE(torch.nn.Module):
    """A mixture of experts of a family tp_ffn.hf does not know (its routing could be anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(32, E, bias=False)
        mlp = transformers.models.llama.modeling_llama.LlamaMLP
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=EXPERT)
        self.experts = torch.nn.ModuleList(mlp(config) for _ in range(E))


def _no_parallel(model: torch.nn.Module) -> bool:
    return not any(type(m).__name__.startswith("Parallel") for m in model.modules())


def test_refused_blocks_name_the_module():
    """Router jitter, expert biases and unknown MoE families: a ValueError naming the module, nothing changed;
    strict=False leaves the whole block dense (its experts too) with one warning."""
    jitter = build("mixtral", router_jitter_noise=0.1)
    where = "mlp" if TF5 else "block_sparse_moe"
    with pytest.raises(
        ValueError, match=rf"^model.layers.0.{where}: MixtralSparseMoeBlock: router jitter .*0.1.* \(and 1 more\)"
    ):
        tphf.parallelize_mlp(jitter)
    assert _no_parallel(jitter)
    with pytest.warns(UserWarning, match=r"left dense: model.layers.0.\w+: MixtralSparseMoeBlock: router jitter"):
        assert tphf.parallelize_mlp(jitter, strict=False) == 0
    assert _no_parallel(jitter)

    biased = build("qwen2_moe")
    if TF5:
        biased.model.layers[1].mlp.experts.has_bias = True
        match = r"^model.layers.1.mlp: Qwen2MoeSparseMoeBlock: experts: expected .* without biases, got \{'has_bias': T"
    else:
        biased.model.layers[1].mlp.experts[2].up_proj = torch.nn.Linear(32, EXPERT, dtype=torch.float64)
        match = r"^model.layers.1.mlp: Qwen2MoeSparseMoeBlock: experts.2.up_proj: expert biases are not supported"
    with pytest.raises(ValueError, match=match):
        tphf.parallelize_mlp(biased)
    assert _no_parallel(biased)

    holder = torch.nn.Sequential(_OtherMoE(), transformers.models.llama.modeling_llama.LlamaMLP(
        transformers.LlamaConfig(hidden_size=32, intermediate_size=EXPERT)))  # fmt: skip
    with pytest.raises(ValueError, match=r"^0: _OtherMoE: a mixture of experts tp_ffn.hf does not take"):
        tphf.parallelize_mlp(holder)
    assert _no_parallel(holder)
    with pytest.warns(UserWarning, match=r"left dense: 0: _OtherMoE"):
        assert tphf.parallelize_mlp(holder, strict=False) == 1  # the MLP beside it, not the experts inside it
    assert _no_parallel(holder[0]) and isinstance(holder[1], tphf.ParallelMLP)
    with pytest.raises(ValueError, match=r"^model: is itself such a block; pass the model that holds it"):
        tphf.parallelize_mlp(build("olmoe").model.layers[0].mlp)


def test_parallelized_model_keeps_names_modes_and_plans():
    """A second call replaces nothing; train mode, requires_grad (frozen experts stay frozen) and the model's own
    router object (transformers 5 records its outputs for the auxiliary loss) are kept; tp/ep plan rules naming
    the block or anything inside it are dropped, others kept."""
    model = build("qwen2_moe").train()
    layer = model.model.layers[0].mlp
    gate = layer.gate
    for p in layer.experts.parameters():
        p.requires_grad_(False)
    model.model._tp_plan = {
        "layers.*.mlp.experts.gate_up_proj": "x",
        "layers.*.mlp": "y",
        "layers.*.self_attn.q_proj": "z",
    }
    model.model._ep_plan = {"layers.*.mlp.experts": "ep", "layers.*": "layer"}
    assert tphf.parallelize_mlp(model) == 2 and tphf.parallelize_mlp(model) == 0
    block = model.model.layers[0].mlp
    assert isinstance(block, ParallelSparseMoeBlock) and block.gate is gate and block.router is gate
    assert block.training and not block.experts.w1.requires_grad
    assert model.model.layers[1].mlp.experts.w2.requires_grad
    assert model.model._tp_plan == {"layers.*.self_attn.q_proj": "z"} and model.model._ep_plan == {"layers.*": "layer"}
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    y = block(x)
    assert isinstance(y, torch.Tensor) if TF5 else isinstance(y, tuple) and y[1].shape == (10, E)


def test_docs_list_the_supported_blocks():
    """docs/moe.md names every supported block class and what is refused."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "moe.md").read_text()
    section = text.split("## Hugging Face MoE models", 1)[1].split("\n## ", 1)[0]
    from tp_ffn.hf.moe import MOE_BLOCKS

    for name in MOE_BLOCKS:
        assert f"`{name}`" in section, name
    for refused in ("router_jitter_noise", "bias", "strict=False"):
        assert refused in section, refused
