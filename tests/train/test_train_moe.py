"""The training job on mixture-of-experts models (issue 20, item 3).

``--preset tiny-moe`` (4 experts of 43 rows, top 2, a gated shared expert of 37: 22/21 and 19/18 rows
over TP 2) trains the same at TP=1, TP=2 and TP=2 with sequence parallelism (1e-4 relative per step,
as the dense presets); a resumed run equals the uninterrupted one, also resharded TP=2 -> TP=1 and
TP=2 -> TP=1 x DP=2 (FSDP2 cutting the stacked experts along E); the auxiliary loss is nonzero and
changes the steps; the FLOP count of a hand-computed case; a tiny Mixtral written by transformers
loads with the logits and auxiliary loss transformers computes, trains from ``--init-from``, and
exports back bit for bit (one process and TP=2); so does a tiny Qwen2-MoE (q/k/v biases, a gated
shared expert), and the preset itself is written as a Qwen2-MoE transformers runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.rankpool import run_ranks
from support.train_runs import run_training

from tp_ffn.models import PRESETS, LlamaConfig, Transformer
from tp_ffn.train import TrainConfig, train
from tp_ffn.train import checkpoint as ck

BASE = dict(
    preset="tiny-moe", steps=20, seq_len=32, batch_size=8, corpus_bytes=200_000, val_every=10, val_sequences=8,
    lr=3e-3, warmup_steps=5, seed=0, progress=False,
)  # fmt: skip
RTOL = 1e-4


def _run(world: int, **overrides) -> dict:
    return run_training(world, BASE, **overrides)


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Config, FLOPs, memory plan: one process.


def test_config_experts_and_dense_compatibility():
    cfg = PRESETS["tiny-moe"]
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.hidden_dim, moe.shared_hidden_dim) == (4, 2, 43, 37)
    assert moe.shared_expert_gate and moe.norm_topk_prob
    # A dense config (every checkpoint's meta.json before experts) is unchanged.
    old = {f: getattr(PRESETS["tiny"], f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    assert LlamaConfig(**old).moe is None and LlamaConfig(**old).n_experts == 0
    with pytest.raises(ValueError, match=r"n_experts_per_token, shared_expert_hidden_dim set, but n_experts is 0"):
        LlamaConfig(n_experts_per_token=4, shared_expert_hidden_dim=8)
    with pytest.raises(ValueError, match=r"top_k: expected at most num_experts \(4\), got 5"):
        cfg.updated(n_experts_per_token=5)
    with pytest.raises(ValueError, match=r"routing: 'sigmoid' \(DeepSeek-V3\) is not trained"):
        cfg.updated(routing="sigmoid")
    with pytest.raises(ValueError, match=r"router_aux_loss_coef: expected a finite number >= 0"):
        cfg.updated(router_aux_loss_coef=-1.0)
    from tp_ffn.train.config import parse_model_args

    assert parse_model_args("routing=topk_sigmoid,shared_expert_gate=false,n_experts=8") == {
        "routing": "topk_sigmoid", "shared_expert_gate": False, "n_experts": 8,
    }  # fmt: skip


@pytest.mark.parametrize("mode", [{"ffn_fuse_gate_up": True}, {"ffn_comm_chunks": 2}, {"ffn_overlap_comm": False}])
def test_dense_block_modes_are_refused_for_experts(mode):
    """The dense block's modes do not exist in the MoE block: asked for, they are refused, not ignored."""
    from tp_ffn.train.errors import UsageError

    args = TrainConfig(preset="tiny-moe", **mode)
    with pytest.raises(UsageError, match=r"modes of the dense feed-forward block; .* \(n_experts=4\)"):
        args.check_model(PRESETS["tiny-moe"])
    TrainConfig(preset="tiny-moe").check_model(PRESETS["tiny-moe"])  # the defaults pass


# dim 8, 1 layer, 2 heads of 4 (1 kv head), vocab 16; 4 experts of 5, top 2; shared expert 3 with its gate.
HAND = LlamaConfig(
    dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, max_seq_len=16, n_experts=4, n_experts_per_token=2,
    expert_hidden_dim=5, shared_expert_hidden_dim=3, shared_expert_gate=True,
)  # fmt: skip


def test_flops_count_active_parameters_only():
    from tp_ffn.train.budget.flops import matmul_params, model_flops_per_token

    # attention: wq 64 + wk 32 + wv 32 + wo 64 = 192; active FFN: router 8*4 = 32, two experts 2*3*8*5 = 240,
    # shared expert 3*8*3 = 72, gate 8: 352; output head 8*16 = 128.
    assert matmul_params(HAND) == 192 + 352 + 128
    assert model_flops_per_token(HAND, 10) == 6 * 672 + 12 * 1 * 8 * 10
    # Every parameter: embedding and head 2*128, attention 192, router 32 + four experts 480 + 72 + 8, norms 16,
    # final norm 8.
    assert HAND.num_params() == 256 + 192 + 592 + 16 + 8
    assert HAND.num_params() == sum(p.numel() for p in Transformer(HAND).parameters())


def test_memory_plan_counts_every_expert():
    from tp_ffn.train.budget.memory import FFNSaved, Layout, Workload, estimate

    work = Workload(16, "float32", False, FFNSaved(0.0, 0.0))
    est = estimate(HAND, Layout(1, 1, 1, False), work)
    assert est.parameters == 4 * HAND.num_params()
    # At TP 2 x DP 2 each rank holds half the experts' rows of half the experts (FSDP2 cuts E).
    cfg = PRESETS["tiny-moe"]
    one = estimate(cfg, Layout(1, 1, 1, False), work).parameters
    four = estimate(cfg, Layout(2, 2, 1, False), work).parameters
    assert one == 4 * cfg.num_params() and four < one / 3


def _kept_by_moe_model(rank: int, world: int, tp: int, sp: bool) -> tuple[int, int, int]:
    """(bytes autograd keeps for one forward + loss of the FSDP2-wrapped tiny-moe model, the plan's
    count, the plan's count for the dense model of the same expert size)."""
    import torch.nn.functional as F

    from tp_ffn.train.budget.memory import FFNSaved, Layout, Workload, saved_activation_bytes
    from tp_ffn.train.budget.memory_use import saved_bytes
    from tp_ffn.train.run.parallelize import build_mesh, parallelize

    cfg = PRESETS["tiny-moe"]
    mesh = build_mesh(torch.device("cpu"), world // tp, tp)
    torch.manual_seed(0)
    model = Transformer(cfg, group=mesh["tp"], sequence_parallel=sp)
    buffers = list(model.buffers())
    model = parallelize(model, mesh)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with saved_bytes(exclude=buffers) as kept:  # as the trainer's loss_and_aux() does it
        logits, aux = model(tokens[:, :-1], return_aux_loss=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) + 0.01 * aux
    loss.backward()
    work = Workload(16, "float32", sp and tp > 1, FFNSaved(4, 16))
    layout = Layout(tp, world // tp, 2, False)
    dense = cfg.updated(n_experts=0, n_experts_per_token=2, expert_hidden_dim=0, shared_expert_hidden_dim=0,
                        shared_expert_gate=False)  # fmt: skip
    return sum(kept.values()), saved_activation_bytes(cfg, layout, work), saved_activation_bytes(dense, layout, work)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, tp, sp", [(1, 1, False), (2, 2, False), (2, 2, True)])
def test_memory_plan_counts_what_an_moe_model_keeps(world, tp, sp):
    for measured, predicted, dense in run_ranks(world, _kept_by_moe_model, tp, sp, timeout=90):
        assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)  # 0.6-1.9% today
        assert abs(dense - measured) > 0.2 * measured  # negative control: the dense count is 23-42% off


def test_aux_loss_is_transformers_definition_over_all_layers():
    from tp_ffn.moe import load_balancing_loss

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-moe"]).double()
    seen = []
    for layer in model.layers:
        layer.feed_forward.router.register_forward_hook(lambda m, i, o: seen.append(o.logits))
    tokens = torch.randint(0, 256, (2, 12))
    logits, aux = model(tokens, return_aux_loss=True)
    assert torch.equal(logits, model(tokens)) and len(seen) == 4
    want = load_balancing_loss(seen[:2], 4, 2)  # HF concatenates every layer's logits before the means
    assert aux.item() > 0 and torch.allclose(aux, want, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Training at several layouts.


@pytest.fixture(scope="module")
def tp1() -> dict:
    return _run(1, tp=1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_moe_tp2_and_sequence_parallel_match_tp1(tp1):
    assert tp1["losses"][-1] < tp1["losses"][0] - 1.0, "the run should learn something"
    assert all(a > 0 for a in tp1["aux"]) and len(tp1["aux"]) == 20
    for sp in (False, True):
        got = _run(2, tp=2, sequence_parallel=sp)
        assert _max_rel(got["losses"], tp1["losses"]) < RTOL, sp
        assert _max_rel(got["aux"], tp1["aux"]) < RTOL, sp
        assert _max_rel([v for _, v in got["val"]], [v for _, v in tp1["val"]]) < RTOL, sp
    other = _run(1, tp=1, seed=1)  # negative control: the bar above is not vacuous
    assert _max_rel(other["losses"], tp1["losses"]) > 100 * RTOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_activation_checkpointing_recomputes_the_same_steps():
    """The blocks return their router logits as outputs: recomputation in backward changes nothing."""
    plain = _run(2, tp=2, sequence_parallel=True, steps=5, val_every=0)
    recomputed = _run(2, tp=2, sequence_parallel=True, steps=5, val_every=0, activation_checkpointing=True)
    assert recomputed["losses"] == plain["losses"] and recomputed["aux"] == plain["aux"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_aux_loss_is_in_the_training_loss(tp1):
    """The step minimises cross-entropy + coef x aux: the same first step (same weights, same batch),
    different later steps when the coefficient changes."""
    other = _run(1, tp=1, model_args={"router_aux_loss_coef": 1.0}, steps=3)
    assert other["losses"][0] == tp1["losses"][0] and other["aux"][0] == tp1["aux"][0]
    assert abs(other["losses"][2] - tp1["losses"][2]) / tp1["losses"][2] > 10 * RTOL


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """TP=2, micro-batches of 4 sequences. The aux loss is one per micro-batch (as transformers' per
    forward): a layout with the same micro-batches (TP=1 x DP=2, one each) optimises the same objective,
    other micro-batch sizes a slightly different one (3e-4 apart in the weights after 10 steps)."""
    d = tmp_path_factory.mktemp("moe_ref_tp2")
    return _run(2, tp=2, ckpt_dir=str(d), ckpt_every=10, micro_batch_size=4), d


def _resume(ref_dir: Path, tmp_path: Path, world: int, **layout) -> tuple[dict, Path]:
    d = tmp_path / "resume"
    d.mkdir()
    shutil.copytree(ref_dir / "step_00000010", d / "step_00000010")
    return _run(world, ckpt_dir=str(d), resume=True, ckpt_every=10, micro_batch_size=4, **layout), d


def _weights_rel(a: Path, b: Path) -> float:
    wa, wb = ck.load_full_tensors(a), ck.load_full_tensors(b)
    assert wa.keys() == wb.keys() and "layers.1.feed_forward.experts.w2" in wa
    assert wa["layers.0.feed_forward.experts.w1"].shape == (4, 43, 64)
    return max(((wa[k] - wb[k]).norm() / wb[k].norm()).item() for k in wa)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_equals_uninterrupted(reference, tmp_path):
    ref, ref_dir = reference
    got, d = _resume(ref_dir, tmp_path, 2, tp=2)
    assert got["start"] == 10 and got["losses"] == ref["losses"][10:] and got["aux"] == ref["aux"][10:]
    assert _weights_rel(d / "step_00000020", ref_dir / "step_00000020") == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, tp, dp", [(1, 1, 1), (2, 1, 2)], ids=["tp2-to-tp1", "tp2-to-tp1dp2"])
def test_resume_reshards_experts(reference, tmp_path, world, tp, dp):
    ref, ref_dir = reference
    got, d = _resume(ref_dir, tmp_path, world, tp=tp, dp=dp)
    assert got["start"] == 10
    assert _max_rel(got["losses"], ref["losses"][10:]) < RTOL
    assert _weights_rel(d / "step_00000020", ref_dir / "step_00000020") < RTOL
    meta = json.loads((d / "step_00000020" / "meta.json").read_text())
    assert (meta["tp"], meta["dp"], meta["model"]["n_experts"]) == (tp, dp, 4)


# ---------------------------------------------------------------------------------------------
# A Mixtral checkpoint written by transformers: load, train from it, export back.

VOCAB = 256  # byte-level data in the --init-from run


def _tiny_mixtral(dtype: torch.dtype) -> torch.nn.Module:
    """Two layers, hidden 32, 4 heads (2 kv), 4 experts of 37 (19/18 over TP 2), top 2, aux weight 0.1."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.1, sliding_window=None, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(7)
    model = transformers.MixtralForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # transformers 5 starts routers at zero: draw them, so the routing depends on the tokens
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixtral")
    _tiny_mixtral(torch.float64).save_pretrained(d, safe_serialization=True)
    return d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b``. Our rotary embedding runs in float32 (as the dense model's,
    tests/models/test_weights.py), so float64 models agree to float32 rounding: 1e-5, as the dense bar."""
    return ((a - b.to(a.dtype)).norm() / b.norm()).item()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_mixtral_logits_and_aux_loss_match_transformers(mixtral_dir, tmp_path):
    from tp_ffn.models.llama import load_pretrained
    from tp_ffn.models.weights import export_hf

    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(mixtral_dir, torch_dtype=torch.float64).eval()
    ours = load_pretrained(mixtral_dir, dtype=torch.float64)
    assert ours.cfg.moe.num_experts == 4 and ours.cfg.router_aux_loss_coef == 0.1
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens, output_router_logits=True)
        logits, aux = ours(tokens, return_aux_loss=True)
    assert _rel(logits, want.logits) < 1e-5
    assert _rel(aux, want.aux_loss) < 1e-6 and aux.item() > 0
    export_hf(ours, tmp_path / "out")
    src, out = _tensors(mixtral_dir), _tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, want.logits, rtol=0, atol=0)


def _tiny_qwen2_moe(dtype: torch.dtype, **overrides) -> torch.nn.Module:
    """Two layers, hidden 32, 4 experts of 37, top 2, a gated shared expert of 23, q/k/v biases drawn."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 37, "shared_expert_intermediate_size": 23,
        "router_aux_loss_coef": 0.1, "norm_topk_prob": False, **overrides,
    })  # fmt: skip
    torch.manual_seed(8)
    model = transformers.Qwen2MoeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "proj.bias")):  # routers (zero in transformers 5) and biases (zeros)
                p.normal_(0, 0.5)
    return model


def test_qwen2_moe_logits_and_round_trip(tmp_path):
    from tp_ffn.models.llama import load_pretrained
    from tp_ffn.models.weights import export_hf

    hf = _tiny_qwen2_moe(torch.float64)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    ours = load_pretrained(tmp_path / "src", dtype=torch.float64)
    assert ours.cfg.qkv_bias and ours.cfg.moe.shared_hidden_dim == 23 and not ours.cfg.moe.norm_topk_prob
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(tokens, output_router_logits=True)
        logits, aux = ours(tokens, return_aux_loss=True)
    assert _rel(logits, want.logits) < 1e-5
    assert _rel(aux, want.aux_loss) < 1e-6 and aux.item() > 0
    export_hf(ours, tmp_path / "out")
    src, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    with pytest.raises(ValueError, match=r"mlp_only_layers: not supported \(every layer a mixture of experts\)"):
        _tiny_qwen2_moe(torch.float64, mlp_only_layers=[1]).save_pretrained(tmp_path / "dense1")
        load_pretrained(tmp_path / "dense1")


def test_tiny_moe_exports_as_qwen2_moe(tmp_path):
    """The preset (a gated shared expert, no q/k/v biases) is written as Qwen2-MoE with zero biases:
    transformers computes its logits."""
    from tp_ffn.models.weights import export_hf

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Transformer(PRESETS["tiny-moe"]).double()
    export_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float64).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _rel(hf(tokens).logits, ours(tokens)) < 1e-5


def _export_at_tp(rank: int, world: int, src: str, dst: str) -> None:
    from tp_ffn.models.llama import load_pretrained
    from tp_ffn.models.weights import export_hf

    model = load_pretrained(src, group=None, dtype=torch.float64)  # the default group: both ranks
    assert model.layers[0].feed_forward.experts.w1.shape == (4, 19 - rank, 32)
    export_hf(model, dst)


@pytest.mark.timeout(120)
def test_mixtral_round_trip_at_tp2_is_bitwise(mixtral_dir, tmp_path):
    run_ranks(2, _export_at_tp, str(mixtral_dir), str(tmp_path / "out"), timeout=90)
    src, out = _tensors(mixtral_dir), _tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)


def _first_loss(rank: int, world: int, overrides: dict) -> float:
    return train(TrainConfig(**{**BASE, **overrides})).losses[0]


@pytest.mark.timeout(300)
def test_init_from_mixtral_trains_its_weights(tmp_path):
    """--init-from a float32 Mixtral at TP=2: the first step's loss is transformers' cross-entropy of that
    model on the first batch."""
    import torch.nn.functional as F

    from tp_ffn.train.data.corpus import Windows, load_corpus

    hf = _tiny_mixtral(torch.float32)
    src = tmp_path / "mixtral32"
    hf.save_pretrained(src, safe_serialization=True)
    corpus = load_corpus(None, corpus_bytes=BASE["corpus_bytes"], val_fraction=0.05, seq_len=BASE["seq_len"])
    batch = Windows(corpus.train, BASE["seq_len"], BASE["seed"]).batch(0, BASE["batch_size"])
    with torch.no_grad():
        want = F.cross_entropy(hf(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    overrides = {"tp": 2, "steps": 1, "val_every": 0, "init_from": str(src), "tokenizer": "bytes"}
    got = run_ranks(2, _first_loss, overrides, timeout=240)[0]
    assert abs(got - want) / want < 1e-5
