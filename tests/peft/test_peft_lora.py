"""tp_ffn.peft: PEFT's LoRA on the tensor-parallel MLP, held against PEFT's dense LoRA.

Every parallel model is compared with the same transformers model (4.46.3) adapted by PEFT without tp_ffn, from
the same seed, in float64 at world sizes 1-4 with intermediate_size 37 (uneven at every world size from 2 to 4):
adapter draws, logits, the input gradient, the LoRA gradients (each rank's shard against the dense gradient's
rows / columns), every parameter after an AdamW step, and with dropout the generator's state afterwards.
Tolerance 1e-12 relative (the only difference is the order of sums across ranks and ``act(g) * (u * mask)``
against ``(act(g) * u) * mask``); the draws and the loaded / gathered tensors are compared bitwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.hf_models import INTERMEDIATE, build, tokens
from support.rankpool import run_ranks
from support.reference import rel_err

pytest.importorskip("transformers")
pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

import tp_ffn.hf as tphf
import tp_ffn.peft  # noqa: F401  (also imported by parallelize_mlp; here for the dense reference's PEFT)
from tp_ffn import FeedForward, ParallelFeedForward, shard_bounds
from tp_ffn.diagnostics import count_collectives

TOL = 1e-12
ROOT = Path(__file__).resolve().parents[2]
MLP = ["gate_proj", "up_proj", "down_proj"]
# A different execution mode at each world size (the LoRA path runs the reference GEMMs in all of them).
MODES = {1: {}, 2: {"fuse_gate_up": True}, 3: {"overlap_comm": True}, 4: {"overlap_comm": False, "comm_chunks": 2}}
CASES = {
    "mlp": ({"target_modules": MLP, "r": 4, "lora_alpha": 16, "init_lora_weights": False}, {}),
    "all-linear rslora dropout bias": (
        {"target_modules": "all-linear", "r": 8, "lora_alpha": 8, "use_rslora": True, "lora_dropout": 0.25,
         "init_lora_weights": False, "rank_pattern": {"down_proj": 3}},
        {"mlp_bias": True},
    ),  # fmt: skip
    "down only dropout": ({"target_modules": ["down_proj"], "r": 5, "lora_dropout": 0.5, "init_lora_weights": False}, {}),
}


def _pair(config: dict, world: int, seed: int = 3, **model: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(dense PEFT model, parallel PEFT model)`` from the same base weights and the same generator state."""
    base = build("llama", **model)
    par = copy.deepcopy(base)
    tphf.parallelize_mlp(par, **MODES[world])
    torch.manual_seed(seed)
    dense = get_peft_model(base, LoraConfig(**config))
    torch.manual_seed(seed)
    return dense, get_peft_model(par, LoraConfig(**config))


def _shard(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a dense tensor of the PEFT model."""
    s, e = shard_bounds(INTERMEDIATE, world, rank)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return full if ".lora_A." in name else full[s:e]
    if ".mlp.down_proj." in name:
        return full[:, s:e] if (".lora_A." in name or name.endswith("base_layer.weight")) else full
    return full


def _step(rank: int, world: int, case: str) -> dict[str, float]:
    config, model = CASES[case]
    dense, par = _pair(config, world, **model)
    out: dict[str, float] = {}
    n_lora = [sum(".lora_" in k for k in m.state_dict()) for m in (dense, par)]
    assert n_lora[0] == n_lora[1] > 0, n_lora
    full = tphf.full_state_dict(par)
    for k, v in dense.state_dict().items():
        assert torch.equal(full[k], v), f"draw differs: {k}"
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(2, 9, 32, dtype=torch.float64, generator=g)
    labels = tokens(seed=2)
    states, logits, inputs = [], [], []
    for m in (dense, par):
        m.train()
        x = emb.clone().requires_grad_(True)
        torch.manual_seed(11)  # the same dropout draws for both
        res = m(inputs_embeds=x, labels=labels)
        res.loss.backward()
        states.append(torch.get_rng_state())
        logits.append(res.logits)
        inputs.append(x.grad)
    out["logits"] = rel_err(logits[1], logits[0])
    out["input grad"] = rel_err(inputs[1], inputs[0])
    out["rng state after forward differs"] = float(not torch.equal(states[0], states[1]))
    dense_params = dict(dense.named_parameters())
    for name, p in par.named_parameters():
        if p.requires_grad:
            assert ".lora_" in name, name
            out[f"grad {name}"] = rel_err(p.grad, _shard(name, dense_params[name].grad, rank, world))
        else:
            # LoRA's frozen base keeps no weight gradients.
            assert p.grad is None, name
    for m in (dense, par):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        opt.step()
    full, want = tphf.full_state_dict(par), dense.state_dict()
    assert list(full) == list(want)
    out.update({f"after step {k}": rel_err(full[k], want[k]) for k in want})
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_equals_dense_peft(world, case):
    """get_peft_model on the parallel model draws the dense adapter (bitwise); logits, the input gradient, each
    LoRA gradient and every parameter after AdamW equal dense PEFT's, dropout included (same seed); the
    generator ends where dense PEFT's does (so the ranks of a group stay in agreement); the base keeps no grads."""
    for rank, errs in enumerate(run_ranks(world, _step, case, timeout=280)):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


def _block_pair(world: int, sp: bool, seq: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A bare FeedForward and its ParallelFeedForward (w1/w2/w3), both adapted by PEFT from the same seed."""

    class Holder(torch.nn.Module):
        def __init__(self, ffn: torch.nn.Module) -> None:
            super().__init__()
            self.ffn = ffn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ffn(x)

    torch.manual_seed(0)
    dense = FeedForward(16, INTERMEDIATE, bias=True, dtype=torch.float64)
    par = ParallelFeedForward.from_dense(dense, sequence_parallel=sp)
    config = {"target_modules": ["w1", "w2", "w3"], "r": 3, "lora_dropout": 0.3, "init_lora_weights": False}
    torch.manual_seed(1)
    dense_peft = get_peft_model(Holder(dense), LoraConfig(**config))
    torch.manual_seed(1)
    return dense_peft, get_peft_model(Holder(par), LoraConfig(**config))


def _block(rank: int, world: int, sp: bool) -> dict[str, object]:
    """The core block with LoRA, sequence parallel or not: exactness and the collectives, forward and backward."""
    seq = 2 * world + (0 if sp else 1)
    dense, par = _block_pair(world, sp, seq)
    x = torch.randn(2, seq, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(2, seq, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rows = slice(rank * seq // world, (rank + 1) * seq // world) if sp else slice(None)
    out: dict[str, object] = {}
    for name, m in (("dense", dense), ("par", par)):
        m.train()
        xi = (x[:, rows] if name == "par" else x).clone().requires_grad_(True)
        torch.manual_seed(5)
        with count_collectives() as fwd:
            y = m(xi)
        with count_collectives() as bwd:
            y.backward(dy[:, rows] if name == "par" else dy)
        out[name] = (y.detach(), xi.grad)
        out[f"{name} counts"] = (dict(fwd), dict(bwd))
    (yd, gd), (yp, gp) = out.pop("dense"), out.pop("par")
    out["y"] = rel_err(yp, yd[:, rows])
    out["dx"] = rel_err(gp, gd[:, rows])
    dense_params = dict(dense.named_parameters())
    s, e = shard_bounds(INTERMEDIATE, world, rank)
    for name, p in par.named_parameters():
        if p.requires_grad:
            want = dense_params[name].grad
            if ".w1." in name or ".w3." in name:
                want = want if ".lora_A." in name else want[s:e]
            elif ".lora_A." in name:
                want = want[:, s:e]
            out[f"grad {name}"] = rel_err(p.grad, want)
    # A first block whose input needs no gradient (frozen embeddings): only the factors' gradients are reduced.
    y = par(x[:, rows].clone())
    with count_collectives() as bwd:
        y.sum().backward()
    out["no input grad counts"] = dict(bwd)
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("world", [2, 3])
def test_block_lora_exact_and_collectives(world, sp):
    """PEFT on a bare ParallelFeedForward (w1/w2/w3, biases, dropout, sequence parallel or not) equals PEFT on the
    dense FeedForward, and LoRA adds no collective: forward one all-reduce (SP: all-gather + reduce-scatter);
    backward one all-reduce carrying the input gradient and the whole factors' gradients together (SP: the
    block's reduce-scatter and all-gather, plus one all-reduce of the factors' gradients; the frozen bias of w2
    needs none). A block whose input needs no gradient reduces only the factors' gradients."""
    # On gloo a reduce-scatter is an all-to-all and a sum (tp_ffn.comm._sums_by_all_to_all).
    want_fwd = {"all_gather": 1, "all_to_all": 1} if sp else {"all_reduce": 1}
    want_bwd = {"all_to_all": 1, "all_gather": 1, "all_reduce": 1} if sp else {"all_reduce": 1}
    want_frozen_input = {"all_gather": 1, "all_reduce": 1} if sp else {"all_reduce": 1}
    for rank, res in enumerate(run_ranks(world, _block, sp, timeout=180)):
        assert res.pop("dense counts") == ({}, {})
        assert res.pop("par counts") == (want_fwd, want_bwd), f"rank {rank}"
        assert res.pop("no input grad counts") == want_frozen_input, f"rank {rank}"
        bad = {k: v for k, v in res.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


def _clip(rank: int, world: int) -> dict[str, float]:
    """tp_ffn.hf.clip_grad_norm_ on the parallel LoRA model against torch's on the dense PEFT model (the trainable
    parameters are the LoRA factors alone, a third of them sharded), and torch's own on the parallel model."""
    config = {"target_modules": "all-linear", "r": 4, "init_lora_weights": False}
    out: dict[str, float] = {}
    for name, clip in (("tp_ffn", tphf.clip_grad_norm_), ("control: torch", None)):
        dense, par = _pair(config, world)
        x = tokens(seed=4)
        for m in (dense, par):
            m(x, labels=x).loss.backward()
        want = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.01)
        got = clip(par, 0.01) if clip else torch.nn.utils.clip_grad_norm_(par.parameters(), 0.01)
        out[f"{name} norm"] = rel_err(got, want)
        dense_params = dict(dense.named_parameters())
        grads = [
            rel_err(p.grad, _shard(k, dense_params[k].grad, rank, world))
            for k, p in par.named_parameters()
            if p.requires_grad
        ]
        out[f"{name} grads"] = max(grads)
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_clip_counts_the_sharded_lora_factors(world):
    """The Trainer's clipping under prepare_trainer on a LoRA model: the norm of the dense PEFT model's LoRA
    gradients, each sharded factor (B of gate/up, A of down) counted once over the group, and the clipped
    gradients the dense ones. Control: torch's clipping on the parallel model, off by far more."""
    for rank, got in enumerate(run_ranks(world, _clip, timeout=180)):
        assert got["tp_ffn norm"] < TOL and got["tp_ffn grads"] < TOL, (rank, got)
        assert got["control: torch norm"] > 1e-4 and got["control: torch grads"] > 1e-4, (rank, got)


def _whole_factors(rank: int, world: int) -> list[torch.Tensor]:
    par = build("llama")
    tphf.parallelize_mlp(par)
    torch.manual_seed(rank)  # generators that disagree across the group
    par = get_peft_model(par, LoraConfig(target_modules=MLP, init_lora_weights=False))
    mlp = par.base_model.model.model.layers[1].mlp
    return [mlp.gate_proj.lora_A["default"].weight.detach(), mlp.down_proj.lora_B["default"].weight.detach()]


@pytest.mark.timeout(120)
def test_whole_factors_agree_across_the_group():
    """The factors every rank holds whole (A of gate/up, B of down) are the same on every rank even where the
    ranks' generators differ at get_peft_model (they are broadcast from the group's first rank)."""
    got = run_ranks(2, _whole_factors, timeout=100)
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1]))


def _save_load(rank: int, world: int, root: str) -> dict[str, float]:
    config = {"target_modules": "all-linear", "r": 4, "init_lora_weights": False, "lora_alpha": 12}
    dense, par = _pair(config, world, seed=21)
    base = build("llama")
    x = tokens(seed=5)
    dense_dir, par_dir = os.path.join(root, "dense"), os.path.join(root, "par")
    out: dict[str, float] = {}
    # 1. A dense adapter (written by PEFT alone) onto the parallel model: each rank takes its slices.
    if rank == 0:
        dense.save_pretrained(dense_dir)
    dist.barrier()
    mine = copy.deepcopy(base)
    tphf.parallelize_mlp(mine)
    torch.manual_seed(99)  # other draws than the adapter's: the loaded values must replace them
    loaded = PeftModel.from_pretrained(mine, dense_dir)
    with torch.no_grad():
        out["dense adapter -> parallel"] = rel_err(loaded(x).logits, dense(x).logits)
    full = tphf.full_state_dict(loaded)
    out["loaded tensors differ"] = float(
        any(not torch.equal(full[k], v) for k, v in dense.state_dict().items() if ".lora_" in k)
    )
    # The same with PEFT's low_cpu_mem_usage: adapters built on the meta device, then the slices assigned.
    mine = copy.deepcopy(base)
    tphf.parallelize_mlp(mine)
    lean = PeftModel.from_pretrained(mine, dense_dir, low_cpu_mem_usage=True)
    with torch.no_grad():
        out["dense adapter -> parallel, low_cpu_mem_usage"] = rel_err(lean(x).logits, dense(x).logits)
    # 2. The parallel model's adapter, changed by a step, written as PEFT's dense files, onto plain transformers.
    par.train()
    par(tokens(seed=6), labels=tokens(seed=6)).loss.backward()
    torch.optim.AdamW([p for p in par.parameters() if p.requires_grad], lr=1e-2).step()
    par.eval()
    if world > 1:
        for bad_save in ({}, {"state_dict": par.state_dict()}):
            with pytest.raises(ValueError, match="full_state_dict"):
                par.save_pretrained(par_dir, **bad_save)
    sd = tphf.full_state_dict(par)
    if rank == 0:
        par.save_pretrained(par_dir, state_dict=sd)
    dist.barrier()
    plain = PeftModel.from_pretrained(copy.deepcopy(base), par_dir)
    with torch.no_grad():
        out["parallel -> dense files -> transformers"] = rel_err(plain(x).logits, par(x).logits)
    # 3. merge_and_unload: the parallel model with merged weights, plain parallel layers in the slots.
    merged, merged_dense = par.merge_and_unload(), plain.merge_and_unload()
    mlp = merged.model.layers[0].mlp
    assert type(mlp.gate_proj).__name__ == "ColumnParallelLinear" and type(mlp.down_proj).__name__ == "RowParallelLinear"
    with torch.no_grad():
        out["merged logits"] = rel_err(merged(x).logits, merged_dense(x).logits)
    got, want = tphf.full_state_dict(merged), merged_dense.state_dict()
    assert list(got) == list(want)
    out.update({f"merged {k}": rel_err(got[k], want[k]) for k in want})
    dist.barrier()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_save_load_merge_round_trips(world, tmp_path):
    """A dense adapter loads onto the parallel model (bitwise); the parallel adapter saved through full_state_dict
    is PEFT's dense adapter, which plain transformers + PeftModel.from_pretrained reads to the same logits; plain
    save_pretrained, or one given this rank's shards, refuses (W > 1); merge_and_unload merges into the shards."""
    for rank, errs in enumerate(run_ranks(world, _save_load, str(tmp_path), timeout=280)):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


def test_unsupported_is_one_clear_error():
    """What the parallel layers cannot do is refused before anything is changed, naming the option; the layers
    refuse to run alone and refuse per-call adapter selection (their hooks would never run)."""
    for bad, match in (
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ):
        par = build("llama")
        tphf.parallelize_mlp(par)
        before = {k: v.clone() for k, v in par.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            get_peft_model(par, LoraConfig(target_modules=MLP, **bad))
        assert list(par.state_dict()) == list(before)  # nothing was wrapped
    # DoRA on attention only is PEFT's business, not refused.
    par = build("llama")
    tphf.parallelize_mlp(par)
    get_peft_model(par, LoraConfig(target_modules=["q_proj"], use_dora=True))
    # A parallel layer outside a block.
    from tp_ffn import ColumnParallelLinear

    holder = torch.nn.Sequential(ColumnParallelLinear(8, 8))
    with pytest.raises(ValueError, match="outside a ParallelFeedForward"):
        get_peft_model(holder, LoraConfig(target_modules=["0"]))
    par = build("llama")
    tphf.parallelize_mlp(par)
    peft_model = get_peft_model(par, LoraConfig(target_modules=MLP))
    mlp = peft_model.base_model.model.model.layers[0].mlp
    with pytest.raises(RuntimeError, match="called on its own"):
        mlp.gate_proj(torch.zeros(1, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="adapter_names"), torch.no_grad():
        peft_model.eval()(tokens(), adapter_names=["default"] * 2)


def test_disable_and_merge_follow_peft():
    """disable_adapter(), merge_adapter() / unmerge_adapter() and a second adapter behave as in dense PEFT."""
    dense, par = _pair({"target_modules": MLP, "init_lora_weights": False}, 1)
    x = tokens()
    with torch.no_grad():
        with dense.disable_adapter(), par.disable_adapter():
            assert rel_err(par(x).logits, dense(x).logits) < TOL
        for m in (dense, par):
            m.merge_adapter()
        assert rel_err(par(x).logits, dense(x).logits) < TOL
        for m in (dense, par):
            m.unmerge_adapter()
            torch.manual_seed(8)
            m.add_adapter("two", LoraConfig(target_modules=["down_proj"], init_lora_weights=False))
            m.base_model.set_adapter(["default", "two"])
        assert rel_err(par(x).logits, dense(x).logits) < TOL


@pytest.mark.slow
def test_fresh_process_needs_no_extra_import():
    """In a fresh interpreter, parallelize_mlp then get_peft_model(all-linear) works with no other import
    (peft 0.21 with torch 2.13 needs torch.distributed.tensor imported first: tp_ffn.peft does it)."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from support.hf_models import build\n"
        "import tp_ffn.hf\n"
        "from peft import LoraConfig, get_peft_model\n"
        "m = build('llama'); tp_ffn.hf.parallelize_mlp(m)\n"
        "m = get_peft_model(m, LoraConfig(target_modules='all-linear'))\n"
        "print(sum('.lora_' in k for k in m.state_dict()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "28"  # 2 layers x (q, k, v, o, gate, up, down) x (A, B)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_memory_script_smoke():
    """benchmarks/lora_memory.py at TP=2 on a tiny model, both modes: LoRA's frozen base keeps no gradients, its
    gradients and AdamW state are those of the adapters only, and each is a small part of full fine-tuning's."""
    import json

    rows = {}
    for mode in ("lora", "full"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "benchmarks" / "lora_memory.py"), "--mode", mode, "--hidden", "64", "--intermediate", "173",
            "--layers", "2", "--heads", "4", "--vocab", "256", "--lora-rank", "4", "--tokens", "128", "--seq", "64",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rows[mode] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert [row["rank"] for row in rows[mode]] == [0, 1]
    for lora, full in zip(rows["lora"], rows["full"]):
        assert lora["frozen_params_with_grad"] == 0
        assert lora["grads_bytes"] == lora["trainable_bytes"] < full["grads_bytes"] / 5
        assert lora["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 5
        assert full["grads_bytes"] == full["trainable_bytes"] == full["params_bytes"]
