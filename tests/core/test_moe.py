"""The MoE block against its dense float64 reference on gloo groups of 1-4 ranks, and its routings and
auxiliary loss against Hugging Face transformers and direct transcriptions of the formulas.

Tolerances: float64 parallel against float64 dense differs only in the order of sums (over ranks and
within GEMMs): a few ulps, so 1e-12 relative, while a missing reduction, a wrong shard or a routing
weight applied twice is >= 1e-3. fp32 against float64 (the grouped-GEMM path, which takes no float64):
1e-5, as in test_ffn_parallel.py. HF's blocks run in float32 as they would (they round the routing
weights through float32 anyway): 1e-5.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from support.rankpool import run_ranks
from support.reference import rel_err, worst
from torch.utils._python_dispatch import TorchDispatchMode

from tp_ffn import (
    MoEConfig,
    MoEFeedForward,
    ParallelMoEFeedForward,
    gather_sequence,
    load_balancing_loss,
    split_sequence,
)
from tp_ffn.comm import all_gather_along
from tp_ffn.grouped import dispatch_by_expert, grouped_mm_fits
from tp_ffn.moe import moe_shapes

DIM, HIDDEN, SHARED, E = 12, 11, 13, 8  # 11 and 13 are uneven over 2, 3 and 4 ranks
BATCH, SEQ = 2, 12  # 12 divides by 1-4 (sequence parallelism)
EMPTY = (6, 7)  # experts no token can choose (see _dense): the empty-expert path runs in every case
TOL = 1e-12
AUX = 0.1  # weight of the auxiliary loss in the tests' loss, so that its gradient is checked too

CASES = {
    "mixtral": MoEConfig(E, 2, HIDDEN),
    "qwen2-moe": MoEConfig(E, 2, HIDDEN, norm_topk_prob=False, shared_hidden_dim=SHARED, shared_expert_gate=True),
    "qwen3-moe+shared": MoEConfig(E, 3, HIDDEN, shared_hidden_dim=SHARED),
    "deepseek-v3": MoEConfig(
        E, 2, HIDDEN, routing="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, shared_hidden_dim=SHARED
    ),
    "llama4": MoEConfig(E, 2, HIDDEN, routing="topk_sigmoid", shared_hidden_dim=SHARED),
}


def _dense(config: MoEConfig, seed: int, dtype: torch.dtype = torch.float64, dim: int = DIM) -> MoEFeedForward:
    """A dense block whose experts EMPTY never win: only their router rows read feature 0 (which _inputs
    sets to 3), with weight -20, so their logits are about -60 where the others' are about +-1."""
    torch.manual_seed(seed)
    dense = MoEFeedForward(dim, config, dtype=dtype)
    with torch.no_grad():
        dense.router.weight[:, 0] = 0.0
        dense.router.weight[list(EMPTY), 0] = -20.0
        if config.routing == "sigmoid":
            bias = dense.router.e_score_correction_bias
            bias.copy_(0.2 * torch.randn(E, dtype=dtype))
            bias[list(EMPTY)] = -1.0
    return dense


def _inputs(seed: int, dtype: torch.dtype = torch.float64, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, dim, generator=g, dtype=dtype)
    x[..., 0] = 3.0
    return x, torch.randn(BATCH, SEQ, dim, generator=g, dtype=dtype)


def _loss(y: torch.Tensor, gy: torch.Tensor, logits: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    return (y * gy).sum() + AUX * load_balancing_loss(logits, config.num_experts, config.top_k)


def _full_grads(par: ParallelMoEFeedForward) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at its full shape, by state-dict key."""
    group, out = par.tp.group, {}
    for name in ("w1", "w2", "w3"):
        spec = par.experts.shard_spec(name)
        out[f"experts.{name}"] = all_gather_along(getattr(par.experts, name).grad, group, spec.dim, spec.rank_sizes)
    if par.shared_expert is not None:
        s = par.shared_expert
        for name, dim in (("w1", 0), ("w2", 1), ("w3", 0)):
            out[f"shared_expert.{name}.weight"] = all_gather_along(
                getattr(s, name).weight.grad, group, dim, s.w1.shard_sizes
            )
    out["router.weight"] = par.router.weight.grad
    if par.shared_expert_gate is not None:
        out["shared_expert_gate.weight"] = par.shared_expert_gate.weight.grad
    return out


def _one_case(config: MoEConfig, sp: bool, seed: int, dtype: torch.dtype, dim: int = DIM) -> dict[str, float]:
    dense = _dense(config, seed, dtype, dim)
    x, gy = _inputs(seed, dtype, dim)
    par = ParallelMoEFeedForward.from_dense(dense, sequence_parallel=sp)
    group = par.tp.group

    ref = MoEFeedForward(dim, config, dtype=torch.float64, device="meta")
    ref.load_state_dict({k: v.double() for k, v in dense.state_dict().items()}, assign=True)
    x64 = x.double().requires_grad_()
    y64, logits64 = ref(x64, return_router_logits=True)
    _loss(y64, gy.double(), logits64, config).backward()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    counts = torch.bincount(ref.router(x64.detach().reshape(-1, dim)).indices.reshape(-1), minlength=E)
    assert counts[list(EMPTY)].sum() == 0 and (counts > 0).sum() >= 4, f"routing counts {counts.tolist()}"

    xl = (split_sequence(x, group) if sp else x).detach().requires_grad_()
    y, logits = par(xl, return_router_logits=True)
    _loss(y, split_sequence(gy, group) if sp else gy, logits, config).backward()
    grads = _full_grads(par)
    torch.optim.SGD(par.parameters(), lr=0.1).step()
    after = par.dense_state_dict()

    y_full = gather_sequence(y.detach(), group) if sp else y.detach()
    m = {
        "output": rel_err(y_full, y64),
        "router logits": rel_err(logits, logits64),
        "input grad": rel_err(xl.grad, split_sequence(x64.grad, group) if sp else x64.grad),
    }
    m.update({f"grad {k}": rel_err(grads[k], v) for k, v in ref_grads.items()})
    m.update({f"after SGD {k}": rel_err(after[k], v) for k, v in ref.state_dict().items()})
    return m


def _equivalence(rank: int, world: int) -> dict[tuple, dict]:
    return {
        (name, sp): _one_case(config, sp, 100 + i, torch.float64)
        for i, (name, config) in enumerate(CASES.items())
        for sp in (False, True)
    }


def _check(per_rank: list[dict], tol: float) -> None:
    failures = []
    for case in per_rank[0]:
        for name, err in worst([r[case] for r in per_rank]).items():
            if not err <= tol:
                failures.append(f"{case}: {name} rel err {err:.2e} > {tol}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_dense_float64(world):
    """Outputs, router logits, input gradient, every gradient (router, experts, shared expert, gate, with
    the auxiliary loss in the loss) and the parameters after an SGD step, each routing, with and without
    sequence parallelism, uneven shards and two experts without tokens."""
    _check(run_ranks(world, _equivalence), TOL)


def _grouped_case(rank: int, world: int) -> tuple[dict, int]:
    """fp32 with 16-byte aligned shards, so the expert GEMMs run as torch._grouped_mm."""
    calls = Counter()
    original = torch._grouped_mm

    def counting(*args, **kwargs):
        calls["grouped_mm"] += 1
        return original(*args, **kwargs)

    torch._grouped_mm = counting
    try:
        config = MoEConfig(E, 2, 16 * world, shared_hidden_dim=8 * world, shared_expert_gate=True)
        out = {sp: _one_case(config, sp, 7, torch.float32, dim=16) for sp in (False, True)}
    finally:
        torch._grouped_mm = original
    return out, calls["grouped_mm"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2])
def test_grouped_mm_path_matches_dense(world):
    per_rank = run_ranks(world, _grouped_case)
    assert all(n >= 9 * 2 for _, n in per_rank), f"torch._grouped_mm calls per rank: {[n for _, n in per_rank]}"
    _check([r for r, _ in per_rank], 1e-5)


def test_grouped_mm_and_loop_agree_with_empty_experts():
    """The same block with torch._grouped_mm and with the loop over experts: the same outputs and
    gradients, bit for bit on the CPU (ATen's CPU grouped GEMM is the same per-group GEMM)."""
    config = MoEConfig(E, 2, 16, shared_hidden_dim=8)
    dense = _dense(config, 3, torch.float32, dim=16)
    x, gy = _inputs(3, torch.float32, dim=16)
    got = []
    for grouped in (True, False):
        par = ParallelMoEFeedForward.from_dense(dense, grouped_gemm=grouped)
        xl = x.clone().requires_grad_()
        (par(xl) * gy).sum().backward()
        got.append([xl.grad, *(p.grad for p in par.parameters())])
    for a, b in zip(*got):
        assert torch.equal(a, b)
    assert grouped_mm_fits(x.reshape(-1, 16), par.experts.w1.transpose(1, 2))
    assert not grouped_mm_fits(x.double().reshape(-1, 16), par.experts.w1.double())
    assert not grouped_mm_fits(torch.randn(5, 6), torch.randn(2, 6, 3))  # 24-byte rows


def test_dispatch_sorts_by_expert_and_combines_in_slot_order():
    indices = torch.tensor([[2, 0], [2, 1], [0, 2]])
    d = dispatch_by_expert(indices, 4)
    assert d.groups.counts.tolist() == [2, 1, 3, 0] and d.groups.offsets.tolist() == [2, 3, 6, 6]
    assert d.token_of.tolist() == [0, 2, 1, 0, 1, 2] and d.groups.bounds == [(0, 2), (2, 3), (3, 6), (6, 6)]
    rows = d.rows(torch.arange(3.0)[:, None] * 10)
    assert rows[:, 0].tolist() == [0, 20, 10, 0, 10, 20]
    assert d.sum_slots(rows).reshape(-1).tolist() == [0, 20, 40]


class _Record(TorchDispatchMode):
    """(kind, elements of the largest tensor argument) of every collective, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.ops.append((func._schema.name, max(t.numel() for t in tensors)))
        return func(*args, **(kwargs or {}))


def _collectives(rank: int, world: int) -> dict:
    out = {}
    for name in ("mixtral", "qwen2-moe"):
        for sp in (False, True):
            dense = _dense(CASES[name], 5, torch.float32)
            par = ParallelMoEFeedForward.from_dense(dense, sequence_parallel=sp)
            x, _ = _inputs(5, torch.float32)
            x = (split_sequence(x, par.tp.group) if sp else x).requires_grad_()
            with _Record() as fwd:
                y, logits = par(x, return_router_logits=True)
            loss = y.square().sum() + load_balancing_loss(logits, E, CASES[name].top_k)
            with _Record() as bwd:
                loss.backward()
            out[(name, sp)] = (sorted(fwd.ops), sorted(bwd.ops))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_per_layer(world):
    """Forward: one all-reduce of [T, dim] (sequence parallel: one all-gather, one reduce-scatter).
    Backward: one [T, dim] collective for the input gradient and one all-reduce of [T, k] routing-weight
    gradients ([T, k+1] with the shared expert's gate); sequence parallel adds the output gradient's
    all-gather, as for the dense block."""
    tokens, big = BATCH * SEQ, BATCH * SEQ * DIM
    for rank, got in enumerate(run_ranks(world, _collectives)):
        for (name, sp), (fwd, bwd) in got.items():
            small = tokens * (CASES[name].top_k + CASES[name].shared_expert_gate)
            if world == 1:
                want = ([], [])
            elif not sp:
                want = ([("c10d::allreduce_", big)], sorted([("c10d::allreduce_", big), ("c10d::allreduce_", small)]))
            else:
                # The reduce-scatter is an all-to-all of the other ranks' blocks and a sum, on gloo.
                gather, scatter = ("c10d::_allgather_base_", big), ("c10d::alltoall_base_", big * (world - 1) // world)
                want = (sorted([gather, scatter]), sorted([gather, scatter, ("c10d::allreduce_", small)]))
            assert (fwd, bwd) == want, f"W={world} rank {rank} {name} sp={sp}: got {(fwd, bwd)}, want {want}"


def _init_state(rank: int, world: int) -> dict:
    out = {}
    for name in ("qwen2-moe", "deepseek-v3"):
        torch.manual_seed(42)
        par = ParallelMoEFeedForward(DIM, CASES[name])
        out[name] = (par.dense_state_dict(), torch.get_rng_state())
    return out


@pytest.mark.timeout(120)
def test_init_is_independent_of_world_size():
    want = {}
    for name in ("qwen2-moe", "deepseek-v3"):
        torch.manual_seed(42)
        dense = MoEFeedForward(DIM, CASES[name])
        want[name] = (dense.state_dict(), torch.get_rng_state())
    for world in (1, 2, 3, 4):
        for rank, got in enumerate(run_ranks(world, _init_state)):
            for name, (sd, rng) in got.items():
                assert list(sd) == list(want[name][0]) == list(moe_shapes(DIM, CASES[name]))
                for k, v in sd.items():
                    assert torch.equal(v, want[name][0][k]), f"W={world} rank {rank} {name}: {k} differs"
                assert torch.equal(rng, want[name][1]), f"W={world} rank {rank} {name}: RNG state after build differs"
    # Every expert drawn afresh: no two experts (or projections) share values.
    w1 = want["qwen2-moe"][0]["experts.w1"]
    assert not torch.equal(w1[0], w1[1]) and abs(w1.std().item() * math.sqrt(3 * DIM) - 1) < 0.1


# --- routings against their sources ------------------------------------------------------------------


def _hf_block(kind: str, norm: bool):
    transformers = pytest.importorskip("transformers")
    common = {"hidden_size": DIM, "num_experts_per_tok": 2, "hidden_act": "silu"}
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = transformers.MixtralConfig(num_local_experts=E, intermediate_size=HIDDEN, **common)
        return MixtralSparseMoeBlock(cfg), MoEConfig(E, 2, HIDDEN)
    if kind == "qwen2-moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = transformers.Qwen2MoeConfig(
            num_experts=E, moe_intermediate_size=HIDDEN, shared_expert_intermediate_size=SHARED,
            norm_topk_prob=norm, **common,
        )  # fmt: skip
        return Qwen2MoeSparseMoeBlock(cfg), MoEConfig(
            E, 2, HIDDEN, norm_topk_prob=norm, shared_hidden_dim=SHARED, shared_expert_gate=True
        )
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = transformers.OlmoeConfig(num_experts=E, intermediate_size=HIDDEN, norm_topk_prob=norm, **common)
    return OlmoeSparseMoeBlock(cfg), MoEConfig(E, 2, HIDDEN, norm_topk_prob=norm)


def _from_hf(block, config: MoEConfig) -> MoEFeedForward:
    """Stack an HF 4.46 per-expert block into our keys (Mixtral w1/w3/w2; the others gate/up/down_proj)."""
    names = ("w1", "w3", "w2") if hasattr(block.experts[0], "w1") else ("gate_proj", "up_proj", "down_proj")
    sd = {"router.weight": block.gate.weight}
    for ours, theirs in zip(("w1", "w3", "w2"), names):
        sd[f"experts.{ours}"] = torch.stack([getattr(ex, theirs).weight for ex in block.experts])
    if config.shared_hidden_dim:
        for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
            sd[f"shared_expert.{ours}.weight"] = getattr(block.shared_expert, theirs).weight
        sd["shared_expert_gate.weight"] = block.shared_expert_gate.weight
    ours = MoEFeedForward(DIM, config, device="meta")
    ours.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True)
    return ours


@pytest.mark.parametrize(
    "kind,norm", [("mixtral", True), ("qwen2-moe", False), ("qwen2-moe", True), ("olmoe", False), ("olmoe", True)]
)
def test_softmax_routing_matches_hf_blocks(kind, norm):
    """The HF 4.46.3 block and ours (dense, and parallel at W=1) on the same weights: outputs, router
    logits, input and router gradients, and the auxiliary loss of transformers' own function."""
    torch.manual_seed(0)
    block, config = _hf_block(kind, norm)
    ours = _from_hf(block, config)
    par = ParallelMoEFeedForward.from_dense(ours)
    x = torch.randn(BATCH, SEQ, DIM)
    gy = torch.randn(BATCH, SEQ, DIM)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    results = []
    for module in (block, ours, par):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        if module is block:
            y, logits = module(xi)
            aux = load_balancing_loss_func((logits,), E, 2)
        else:
            y, logits = module(xi, return_router_logits=True)
            aux = load_balancing_loss(logits, E, 2)
        ((y * gy).sum() + aux).backward()
        router = module.gate.weight if module is block else module.router.weight
        results.append((y, logits, aux, xi.grad, router.grad))
    for got in results[1:]:
        for name, a, b in zip(("output", "logits", "aux", "input grad", "router grad"), got, results[0]):
            assert rel_err(a, b) < 1e-5, f"{kind} norm={norm}: {name} rel err {rel_err(a, b):.2e}"


def _deepseek_v3_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Our transcription of HF's DeepseekV3TopkRouter + DeepseekV3MoE, token by token."""
    c, out = moe.config, []
    w, bias = moe.router.weight, moe.router.e_score_correction_bias
    per_group = c.num_experts // c.n_group
    for xt in x.reshape(-1, DIM):
        scores = torch.sigmoid(w @ xt)
        choice = scores + bias
        group_score = [sorted(choice[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(c.n_group)]
        kept = sorted(range(c.n_group), key=lambda g: -sum(group_score[g]))[: c.topk_group]
        masked = [choice[e].item() if e // per_group in kept else 0.0 for e in range(c.num_experts)]
        chosen = sorted(range(c.num_experts), key=lambda e: -masked[e])[: c.top_k]
        weights = scores[chosen]
        weights = weights / (weights.sum() + 1e-20) * c.routed_scaling_factor
        yt = sum(wt * _expert(moe, e, xt) for wt, e in zip(weights, chosen))
        out.append(yt + moe.shared_expert(xt))
    return torch.stack(out).view_as(x)


def _llama4_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Our transcription of HF's Llama4Router + Llama4TextMoe: every expert on every token, its input
    scaled by sigmoid of the logit (sigmoid(-inf) = 0 outside the top k), outputs summed, plus the shared expert."""
    x2 = x.reshape(-1, DIM)
    logits = x2 @ moe.router.weight.t()
    top, idx = logits.topk(moe.config.top_k, dim=1)
    scores = torch.full_like(logits, -math.inf).scatter(1, idx, top).sigmoid()
    y = moe.shared_expert(x2)
    for e in range(moe.config.num_experts):
        y = y + _expert(moe, e, x2 * scores[:, e : e + 1])
    return y.view_as(x)


def _expert(moe: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    w1, w2, w3 = moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e]
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


@pytest.mark.parametrize("name", ["deepseek-v3", "llama4"])
def test_sigmoid_routings_match_their_formulas(name):
    dense = _dense(CASES[name], 11)
    with torch.no_grad():
        dense.router.weight[list(EMPTY), 0] = 0.5  # every expert in play here
    x, _ = _inputs(11)
    want = (_deepseek_v3_reference if name == "deepseek-v3" else _llama4_reference)(dense, x)
    with torch.no_grad():
        assert rel_err(dense(x), want) < TOL
        assert rel_err(ParallelMoEFeedForward.from_dense(dense)(x), want) < TOL
        if name == "deepseek-v3":  # negative control: the selection bias changes the routing
            dense.router.e_score_correction_bias.zero_()
            assert rel_err(dense(x), want) > 1e-3


# --- the auxiliary loss --------------------------------------------------------------------------------


def _aux_by_hand(layers: list[torch.Tensor], k: int, mask: torch.Tensor | None) -> float:
    """E * sum_e f_e P_e written with loops: f_e the share of (real) tokens with e among their top k,
    P_e the mean probability of e, both over every layer's tokens."""
    n_e = layers[0].shape[1]
    real = [1.0] * layers[0].shape[0] if mask is None else mask.reshape(-1).tolist()
    f, p, count = [0.0] * n_e, [0.0] * n_e, 0.0
    for logits in layers:
        for t, row in enumerate(logits.softmax(-1)):
            count += real[t]
            for e in row.topk(k).indices.tolist():
                f[e] += real[t]
            for e in range(n_e):
                p[e] += real[t] * row[e].item()
    return n_e * sum((f[e] / count) * (p[e] / count) for e in range(n_e))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_formula_and_transformers(masked):
    """float64, two layers of 32 tokens; the mask keeps 16 per layer. Token counts are powers of two,
    so transformers' float32 token fractions are exact and all three agree to 1e-12."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(32, E, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = (torch.arange(32) % 2).reshape(2, 16) if masked else None
    ours = load_balancing_loss(layers, E, 2, attention_mask=mask).item()
    assert abs(ours - _aux_by_hand(layers, 2, mask)) <= 1e-12 * abs(ours)
    # Per-layer losses averaged are not HF's loss (f and P are means over all layers' tokens).
    per_layer = sum(load_balancing_loss(t, E, 2, mask[:, :16] if masked else None).item() for t in layers) / 2
    assert abs(per_layer - ours) > 1e-6
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    theirs = mixtral.load_balancing_loss_func(tuple(layers), E, 2, attention_mask=mask).item()
    assert abs(ours - theirs) <= 1e-12 * abs(ours)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"top_k": 9}, "top_k"),
        ({"routing": "noisy"}, "routing"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"routing": "topk_sigmoid", "norm_topk_prob": True}, "norm_topk_prob"),
        ({"weights_on": "both"}, "weights_on"),
        ({"n_group": 3, "routing": "sigmoid"}, "n_group"),
        ({"n_group": 4}, "n_group"),
        ({"n_group": 4, "topk_group": 5, "routing": "sigmoid"}, "topk_group"),
        ({"hidden_dim": 0}, "hidden_dim"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    args = {"num_experts": E, "top_k": 2, "hidden_dim": HIDDEN, **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"^{field}:"):
        MoEConfig(**args)


def test_config_defaults_follow_the_routing():
    assert MoEConfig(E, 2, HIDDEN).norm_topk_prob is True
    llama4 = MoEConfig(E, 1, HIDDEN, routing="topk_sigmoid")
    assert (llama4.norm_topk_prob, llama4.weights_on) == (False, "input")


def test_bad_state_dict_leaves_the_block_as_it_was():
    config = CASES["qwen2-moe"]
    par = ParallelMoEFeedForward(DIM, config)
    before = {k: v.clone() for k, v in par.state_dict().items()}
    good = MoEFeedForward(DIM, config).state_dict()
    for bad, match in (
        ({k: v for k, v in good.items() if k != "shared_expert_gate.weight"}, r"missing keys \['shared_expert_gate"),
        ({**good, "experts.w4": good["experts.w1"]}, r"unexpected keys \['experts.w4'\]"),
        ({**good, "experts.w2": good["experts.w1"]}, r"sd\['experts.w2'\]: expected shape \(8, 12, 11\)"),
    ):
        with pytest.raises(ValueError, match=match):
            par.load_dense_state_dict(bad)
        assert all(torch.equal(v, before[k]) for k, v in par.state_dict().items())
    with pytest.raises(ValueError, match="^config: expected an MoEConfig with a state dict"):
        ParallelMoEFeedForward.from_dense(good)
    par.load_dense_state_dict(good)
    assert torch.equal(par.experts.w2, good["experts.w2"])


def test_meta_device_builds_without_drawing_then_loads():
    state = torch.get_rng_state()
    par = ParallelMoEFeedForward(DIM, CASES["deepseek-v3"], device="meta")
    assert par.experts.w1.is_meta and torch.equal(torch.get_rng_state(), state)
    dense = _dense(CASES["deepseek-v3"], 1, torch.float32)
    par.load_dense_state_dict(dense.state_dict())
    x, _ = _inputs(1, torch.float32)
    assert not par.router.e_score_correction_bias.is_meta
    assert rel_err(par(x), dense(x)) < 1e-6


def _autocast_case(rank: int, world: int) -> tuple:
    dense = _dense(CASES["qwen2-moe"], 4, torch.float32)
    par = ParallelMoEFeedForward.from_dense(dense)
    x, gy = _inputs(4, torch.float32)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yd, yp = dense(xd), par(xp)
    (yd.float() * gy).sum().backward()
    (yp.float() * gy).sum().backward()
    return yd.dtype, yp.dtype, rel_err(yp, yd), xp.grad.dtype, rel_err(xp.grad, xd.grad), par.experts.w1.grad.dtype


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
def test_autocast_bf16(world):
    """bf16 autocast over fp32 weights: the dense block's output dtype, values within bf16 rounding
    (a few 1e-3), fp32 gradients."""
    for yd, yp, err, gx, gerr, gw in run_ranks(world, _autocast_case):
        assert yd == yp == torch.bfloat16 and gx == gw == torch.float32
        assert err < 2e-2 and gerr < 2e-2, (err, gerr)
