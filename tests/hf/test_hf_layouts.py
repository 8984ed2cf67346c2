"""No silent skips: parallelize_mlp replaces every MLP of a supported layout, names the first gated MLP it cannot
take and the model class when it replaces nothing (strict=True), or warns once (strict=False); the supported and
refused families listed in docs/huggingface-support.md are what it accepts. Single process (a world of one:
the blocks compute the dense GEMMs, so logits are bitwise equal); the multi-rank checks are test_hf.py's and
test_hf_phi3.py's.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from support.hf_models import build, tokens

transformers = pytest.importorskip("transformers")
import tp_ffn.hf as tphf

DOC = Path(__file__).resolve().parents[2] / "docs" / "huggingface-support.md"
COMMON = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
}  # fmt: skip
# What a family's config needs besides COMMON to build at this size.
EXTRA = {
    "Gemma": {"head_dim": 8},
    "Gemma2": {"head_dim": 8},
    "Gemma3": {"head_dim": 8},
    "Qwen3": {"head_dim": 8},
    "Mistral": {"sliding_window": 8},
    "Mixtral": {"num_local_experts": 2},
    "GPT2": {"n_layer": 2, "n_embd": 32, "n_head": 4},
    "Glm": {"head_dim": 8},
}
CONFIGS = {"GPT2LMHeadModel": "GPT2Config", "Gemma3ForCausalLM": "Gemma3TextConfig"}


def _section(title: str) -> list[str]:
    text = DOC.read_text()
    body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `(\w+)`", body, flags=re.M)


def _tiny(class_name: str) -> torch.nn.Module | None:
    """The model class built from a tiny config, float64, or None when this transformers lacks it."""
    family = re.sub(r"(ForCausalLM|LMHeadModel)$", "", class_name)
    config_name = CONFIGS.get(class_name, f"{family}Config")
    if not hasattr(transformers, class_name) or not hasattr(transformers, config_name):
        return None
    common = {} if family == "GPT2" else COMMON
    config = getattr(transformers, config_name)(**{**common, **EXTRA.get(family, {})})
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config).double().eval()


def test_layouts_on_the_page_are_the_registered_ones():
    rows = re.findall(r"^\| ([^|]+?) \| `(\w+)` \|", DOC.read_text(), flags=re.M)
    assert [(r[0], r[1]) for r in rows] == [(lay.projections, lay.parallel_class.__name__) for lay in tphf.LAYOUTS]


def test_supported_families_are_parallelized(record_property):
    """Every class the page lists as supported has all its MLPs replaced, logits bitwise the dense model's."""
    missing = []
    for name in _section("Supported"):
        dense = _tiny(name)
        if dense is None:
            missing.append(name)
            continue
        par = copy.deepcopy(dense)
        assert tphf.parallelize_mlp(par) == 2, name
        assert list(par.state_dict()) == list(dense.state_dict()), name
        with torch.no_grad():
            assert torch.equal(par(tokens()).logits, dense(tokens()).logits), name
    record_property("not in this transformers", missing)
    # 4.46.3 lacks the newer families; 5.x has every one.
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not missing, missing


def test_refused_families_raise():
    for name in _section("Refused"):
        model = _tiny(name)
        assert model is not None, f"{name}: listed as refused but not in transformers {transformers.__version__}"
        with pytest.raises(ValueError, match=r"cannot parallelize|has no MLP tp_ffn.hf can parallelize"):
            tphf.parallelize_mlp(model)
        assert not any(type(m).__name__.endswith("ParallelMLP") for m in model.modules()), name


def test_nothing_replaced_names_the_model_class():
    gpt2 = _tiny("GPT2LMHeadModel")
    with pytest.raises(ValueError, match=r"^model: GPT2LMHeadModel has no MLP tp_ffn.hf can parallelize .*strict=False"):
        tphf.parallelize_mlp(gpt2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tphf.parallelize_mlp(gpt2, strict=False) == 0
    (w,) = caught
    assert "GPT2LMHeadModel has no MLP" in str(w.message) and "\n" not in str(w.message)


def test_unsupported_gated_mlp_names_the_module():
    """A Llama MLP whose gate_proj is a subclass of nn.Linear (a quantized or adapter-wrapped layer): the error
    names the module and what it holds; nothing is replaced, even the MLPs that could be. strict=False replaces
    the rest and warns once. Mixtral's experts (w1/w3 modules in transformers 4, a fused gate_up_proj in 5) are
    not such MLPs: their MoE block is claimed whole first."""
    mixtral = _tiny("MixtralForCausalLM")
    assert tphf.parallelize_mlp(mixtral) == 2
    assert sum(isinstance(m, tphf.ParallelSparseMoeBlock) for m in mixtral.modules()) == 2

    class Wrapped(torch.nn.Linear):
        pass

    model = build("llama")
    old = model.model.layers[1].mlp.gate_proj
    model.model.layers[1].mlp.gate_proj = Wrapped(32, 37, bias=False, dtype=torch.float64)
    model.model.layers[1].mlp.gate_proj.load_state_dict(old.state_dict())
    with pytest.raises(
        ValueError, match=r"^model.layers.1.mlp: a gated MLP tp_ffn.hf cannot parallelize, LlamaMLP \(gate_proj=Wrapped, "
    ):
        tphf.parallelize_mlp(model)
    assert not any(isinstance(m, tphf.ParallelMLP) for m in model.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tphf.parallelize_mlp(model, strict=False) == 1
    (w,) = caught
    assert str(w.message).startswith("parallelize_mlp (strict=False): left dense: model.layers.1.mlp: a gated MLP")
    assert isinstance(model.model.layers[0].mlp, tphf.ParallelMLP)


@pytest.mark.parametrize("wrap", ["PeftModel", "inject_adapter_in_model"])
def test_peft_before_parallelize_says_the_order(wrap):
    """get_peft_model called on the dense model, then parallelize_mlp (on the PeftModel, or on the model PEFT
    injected its layers into): the MLP projections are PEFT's LoRA layers. One ValueError line naming the first
    of them and the order to call things in; nothing changed. strict=False leaves those MLPs dense with one
    warning. LoRA on attention alone does not stand in the way (its MLPs are parallelized), nor does LoRA put
    on blocks already parallel (a second call after the right order returns 0)."""
    peft = pytest.importorskip("peft")
    import torch.distributed.tensor  # noqa: F401  (peft 0.21 on torch 2.13 reads it without importing it)

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    model = build("llama")
    if wrap == "PeftModel":
        model, prefix = peft.get_peft_model(model, config), "base_model.model."
    else:
        model, prefix = peft.inject_adapter_in_model(config, model), ""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = (
        f"{prefix}model.layers.0.mlp.gate_proj (peft.tuners.lora.layer.Linear): a PEFT adapter layer on a dense MLP "
        "(and 5 more); call tp_ffn.hf.parallelize_mlp (or tp_ffn.hf.from_pretrained) first, then get_peft_model"
    )
    with pytest.raises(ValueError) as raised:
        tphf.parallelize_mlp(model)
    assert str(raised.value) == f"{message} (strict=False leaves it dense)"
    assert not any(isinstance(m, tphf.ParallelMLP) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tphf.parallelize_mlp(model, strict=False) == 0
    (w,) = caught
    assert str(w.message) == f"parallelize_mlp (strict=False): left dense: {message}"
    attention_only = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert tphf.parallelize_mlp(attention_only) == 2
    # The right order, then a second call: the adapted blocks are already parallel, nothing to do.
    right = build("llama")
    tphf.parallelize_mlp(right)
    assert tphf.parallelize_mlp(peft.get_peft_model(right, config)) == 0


def test_already_parallel_is_not_an_error():
    model = build("llama")
    assert tphf.parallelize_mlp(model) == 2
    assert tphf.parallelize_mlp(model) == 0


@pytest.mark.slow
def test_from_pretrained_without_accelerate_names_the_extra(tmp_path):
    """With accelerate hidden (as if not installed), from_pretrained says which extra brings it."""
    build("llama").save_pretrained(tmp_path)
    code = (
        "import sys; sys.modules['accelerate'] = None\n"
        "import transformers, tp_ffn.hf\n"
        f"tp_ffn.hf.from_pretrained(transformers.LlamaForCausalLM, {str(tmp_path)!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: tp_ffn.hf.from_pretrained needs accelerate (not installed): pip install 'tp-ffn[hf]'"
    ), out.stderr
