"""tp_ffn.hf.clip_grad_norm_: the dense model's gradient norm on every rank, and the dense model's clipped
gradients, against torch.nn.utils.clip_grad_norm_ on the dense float64 model at world sizes 1-4 with
intermediate_size 37 (uneven from 2 to 4). Tolerance 1e-12 relative (float64; only the order of the sums
across ranks differs). The negative control is torch's own clipping on the parallel model: each rank sees only
its shards, gets another norm, and the replicated gradients drift apart.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from support.hf_models import INTERMEDIATE, build, tokens
from support.rankpool import run_ranks
from support.reference import rel_err

pytest.importorskip("transformers")
import tp_ffn.hf as tphf
from tp_ffn import shard_bounds
from tp_ffn.grad_norm import grad_norm

TOL = 1e-12
CASES = [  # (norm_type, max_norm, foreach)
    (2.0, 0.5, None),
    (2.0, 1e6, False),  # above the norm: nothing is scaled
    (1.0, 0.5, False),
    (math.inf, 0.01, None),
    (0.5, 0.5, None),
]


def _with_grads(seed: int = 2) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense Llama (MLP biases: a replicated row-parallel bias; tied embeddings) and its parallel copy,
    both after one backward on the same tokens; the embeddings frozen, so some parameters have no gradient."""
    dense = build("llama", mlp_bias=True, tie_word_embeddings=True).train()
    dense.model.embed_tokens.weight.requires_grad_(False)
    par = copy.deepcopy(dense)
    tphf.parallelize_mlp(par)
    x = tokens(seed=seed)
    for model in (dense, par):
        model(x, labels=x).loss.backward()
    return dense, par


def _shard(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    s, e = shard_bounds(INTERMEDIATE, world, rank)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return full[s:e]
    if name.endswith(".mlp.down_proj.weight"):
        return full[:, s:e]
    return full


def _same_everywhere(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.is_initialized() else [t]
    if dist.is_initialized():
        dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, t) for g in gathered)


def _clip(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for norm_type, max_norm, foreach in CASES:
        case = f"p={norm_type} max={max_norm}"
        dense, par = _with_grads()
        want = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm, norm_type, foreach=foreach)
        got = tphf.clip_grad_norm_(par, max_norm, norm_type, foreach=foreach)
        out[f"{case} norm"] = rel_err(got, want)
        out[f"{case} same on every rank"] = _same_everywhere(got)
        grads = dict(par.named_parameters())
        for name, p in dense.named_parameters():
            if p.grad is None:
                out[f"{case} {name} has no grad"] = grads[name].grad is None
            else:
                out[f"{case} grad {name}"] = rel_err(grads[name].grad, _shard(name, p.grad, rank, world))
    # The negative control: torch's clipping on the parallel model.
    dense, par = _with_grads()
    want = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    plain = torch.nn.utils.clip_grad_norm_(par.parameters(), 0.5)
    out["control: plain norm error"] = rel_err(plain, want)
    out["control: plain norm same on every rank"] = _same_everywhere(plain)
    out["control: replicated grad same on every rank"] = _same_everywhere(par.model.norm.weight.grad)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_clip_equals_dense(world):
    """Norms 2, 1, inf and 0.5, clipping or not, foreach or not: the total norm is torch's on the dense model and
    the same on every rank, every clipped gradient (shards against the dense rows / columns) is the dense one,
    parameters without a gradient keep none. Control: at W > 1 torch's own clipping on the parallel model is off
    by far more than the tolerance and differs across ranks, and so do the replicated gradients it scales."""
    for rank, got in enumerate(run_ranks(world, _clip, timeout=220)):
        control = {k: got.pop(k) for k in list(got) if k.startswith("control")}
        bad = {k: v for k, v in got.items() if v is not True and not (isinstance(v, float) and v < TOL)}
        assert not bad, f"W={world} rank {rank}: {bad}"
        if world == 1:
            assert control["control: plain norm error"] < TOL
        else:
            assert control["control: plain norm error"] > 1e-4, control
            assert not control["control: plain norm same on every rank"], control
            assert not control["control: replicated grad same on every rank"], control


def _nonfinite(rank: int, world: int) -> dict[str, object]:
    """A NaN (then an inf) in one element of one shard of the last rank: every rank sees the non-finite norm."""
    out: dict[str, object] = {}
    for bad, norm_type in ((float("nan"), 2.0), (float("inf"), 2.0), (float("inf"), math.inf)):
        dense, par = _with_grads()
        if rank == world - 1:
            par.model.layers[1].mlp.up_proj.weight.grad[0, 0] = bad
        key = f"{bad} p={norm_type}"
        try:
            tphf.clip_grad_norm_(par, 1.0, norm_type, error_if_nonfinite=True)
            out[f"{key} raised"] = False
        except RuntimeError as e:
            out[f"{key} raised"] = "is non-finite, so it cannot be clipped" in str(e)
        total = tphf.clip_grad_norm_(par, 1.0, norm_type)
        out[f"{key} returned"] = str(total.item())
        # As torch does on the dense model: every gradient is scaled by max_norm / (non-finite + 1e-6).
        dense.model.layers[1].mlp.up_proj.weight.grad[0, 0] = bad
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0, norm_type)
        out[f"{key} norm weight grad as dense"] = torch.equal(
            par.model.norm.weight.grad.isnan(), dense.model.norm.weight.grad.isnan()
        )
    return out


@pytest.mark.timeout(120)
def test_nonfinite_gradients_as_torch(world=3):
    """At W=3 with the bad element on rank 2 only: error_if_nonfinite raises on every rank (no rank waits in
    a collective), otherwise every rank returns the same non-finite norm and scales as torch does."""
    results = run_ranks(world, _nonfinite, timeout=100)
    for rank, got in enumerate(results):
        assert all(v for k, v in got.items() if k.endswith(("raised", "as dense"))), (rank, got)
        assert got["nan p=2.0 returned"] == "nan" and got["inf p=2.0 returned"] == "inf", (rank, got)
        assert got["inf p=inf returned"] == "inf", (rank, got)


def _phi3(rank: int, world: int) -> dict[str, float]:
    import transformers

    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.Phi3ForCausalLM(config).double().train()
    par = copy.deepcopy(dense)
    tphf.parallelize_mlp(par)
    x = tokens()
    for model in (dense, par):
        model(x, labels=x).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    return {"norm": rel_err(tphf.clip_grad_norm_(par, 0.5), want)}


@pytest.mark.timeout(120)
def test_clip_phi3_counts_the_fused_shards():
    """Phi-3's two-block gate_up_proj shards count once over the group (W=3)."""
    for rank, got in enumerate(run_ranks(3, _phi3, timeout=100)):
        assert got["norm"] < TOL, (rank, got)


def test_core_grad_norm_checks_its_arguments():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    with pytest.raises(ValueError, match=r"sharded_over: expected one entry per parameter \(1\), got 2"):
        grad_norm([p], [None, None])
    assert grad_norm([p], [None]).item() == pytest.approx(math.sqrt(12))
    assert grad_norm([torch.nn.Parameter(torch.ones(2))], [None]).item() == 0.0  # no gradients: 0, as torch
