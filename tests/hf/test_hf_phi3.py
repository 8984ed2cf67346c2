"""Phi-3's fused gate_up_proj under tp_ffn.hf: each half sharded on its own (two row blocks per rank), held
against the dense transformers model in float64 at world sizes 1-3 with intermediate_size 37 (uneven at 2 and
3): logits, every gradient and the parameters after an AdamW step to 1e-12 relative (only the order of the
sums across ranks differs); gathering, saving and loading bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from support.hf_models import INTERMEDIATE, tokens
from support.rankpool import run_ranks
from support.reference import rel_err

transformers = pytest.importorskip("transformers")
import tp_ffn.hf as tphf
from tp_ffn import shard_bounds
from tp_ffn.diagnostics import count_collectives
from tp_ffn.hf.phi3 import Phi3ParallelMLP, gate_up_rows

TOL = 1e-12
I = INTERMEDIATE  # noqa: E741


def _phi3(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(config).to(dtype).eval()


def test_gate_up_rows_by_hand():
    """37 over 3 is 13, 12, 12: rank r holds its rows of the gate half and the same rows of the up half."""
    assert gate_up_rows(37, 1, 0) == [(0, 37), (37, 74)]
    assert [gate_up_rows(37, 3, r) for r in range(3)] == [
        [(0, 13), (37, 50)],
        [(13, 25), (50, 62)],
        [(25, 37), (62, 74)],
    ]
    assert [gate_up_rows(37, 2, r) for r in range(2)] == [[(0, 19), (37, 56)], [(19, 37), (56, 74)]]


def _local(full_gate_up: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's gate_up_proj rows, cut by hand from the dense [2I, H] (not with gate_up_rows)."""
    s, e = shard_bounds(I, world, rank)
    return torch.cat([full_gate_up[s:e], full_gate_up[I + s : I + e]])


MODES = ({}, {"fuse_gate_up": True}, {"overlap_comm": False}, {"comm_chunks": 2})


def _forward_and_step(rank: int, world: int) -> dict[str, float]:
    out: dict[str, float] = {}
    x = tokens(seed=3)
    for mode in MODES:
        dense = _phi3().train()
        par = copy.deepcopy(dense)
        assert tphf.parallelize_mlp(par, **mode) == 2
        assert isinstance(par.model.layers[0].mlp, Phi3ParallelMLP)
        sd, sp = dense.state_dict(), par.state_dict()
        assert list(sd) == list(sp)
        s, e = shard_bounds(I, world, rank)
        for key, full in sd.items():
            want = _local(full, rank, world) if "gate_up_proj" in key else full[:, s:e] if ".mlp.down_proj" in key else full
            assert torch.equal(sp[key], want), (mode, key)
        for model in (dense, par):
            loss = model(x, labels=x).loss
            loss.backward()
            out[f"{mode} loss"] = loss.item()
        out[f"{mode} loss"] = abs(out[f"{mode} loss"] - dense(x, labels=x).loss.item())
        grads = dict(par.named_parameters())
        for name, p in dense.named_parameters():
            want = p.grad
            if "gate_up_proj" in name:
                want = _local(want, rank, world)
            elif ".mlp.down_proj" in name:
                want = want[:, s:e]
            out[f"{mode} grad {name}"] = rel_err(grads[name].grad, want)
        for model in (dense, par):
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()
        full, want = tphf.full_state_dict(par), dense.state_dict()
        assert list(full) == list(want)
        out.update({f"{mode} after step {k}": rel_err(full[k], v) for k, v in want.items()})
        with torch.no_grad():
            out[f"{mode} logits after step"] = rel_err(par(x).logits, dense(x).logits)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_phi3_equals_dense(world):
    """Shards are the two row blocks cut by hand; loss, every gradient, every parameter after an AdamW step and
    the logits after it equal the dense Phi-3's in every execution mode."""
    for rank, errs in enumerate(run_ranks(world, _forward_and_step, timeout=220)):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"W={world} rank {rank}: {bad}"


def _collectives_and_init(rank: int, world: int) -> dict[str, object]:
    par = _phi3()
    tphf.parallelize_mlp(par)
    mlp = par.model.layers[0].mlp.train()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    with count_collectives() as fwd:
        y = mlp(x)
    with count_collectives() as bwd:
        y.sum().backward()
    # Drawn directly (not copied from a dense model): this rank's rows of what Phi3MLP's layers draw.
    torch.manual_seed(5)
    dense_gate_up = torch.nn.Linear(32, 2 * I, bias=False)
    dense_down = torch.nn.Linear(I, 32, bias=False)
    torch.manual_seed(5)
    drawn = Phi3ParallelMLP(32, I, group=None)
    s, e = shard_bounds(I, world, rank)
    return {
        "forward": dict(fwd),
        "backward": dict(bwd),
        "init gate_up": torch.equal(drawn.gate_up_proj.weight, _local(dense_gate_up.weight.detach(), rank, world)),
        "init down": torch.equal(drawn.down_proj.weight, dense_down.weight.detach()[:, s:e]),
        "rng after": torch.equal(torch.rand(3), (torch.manual_seed(5), torch.nn.Linear(32, 2 * I, bias=False),
                                                 torch.nn.Linear(I, 32, bias=False), torch.rand(3))[-1]),
    }  # fmt: skip


@pytest.mark.timeout(120)
def test_one_all_reduce_each_way_and_init_independent_of_tp():
    """At W=2: one all-reduce forward and one backward per block (the fused weight adds none); a block built
    from the seed holds this rank's rows of what the dense Phi3MLP's two layers draw, and leaves the generator
    where the dense layers leave it."""
    for rank, got in enumerate(run_ranks(2, _collectives_and_init, timeout=100)):
        assert got["forward"] == {"all_reduce": 1} and got["backward"] == {"all_reduce": 1}, (rank, got)
        assert got["init gate_up"] and got["init down"] and got["rng after"], (rank, got)


def _save_and_load(rank: int, world: int, root: str) -> dict[str, object]:
    dense = _phi3(torch.float32)
    par = copy.deepcopy(dense)
    tphf.parallelize_mlp(par)
    full = tphf.full_state_dict(par)
    want = dense.state_dict()
    gathered = list(full) == list(want) and all(torch.equal(full[k], v) for k, v in want.items())
    if rank == 0:  # (transformers 5's save_pretrained empties the dict it is given)
        par.save_pretrained(f"{root}/saved", state_dict=full)
    dist.barrier()
    plain = transformers.Phi3ForCausalLM.from_pretrained(f"{root}/saved")
    ours = tphf.from_pretrained(transformers.Phi3ForCausalLM, f"{root}/saved")
    ref = transformers.Phi3ForCausalLM.from_pretrained(f"{root}/saved")
    tphf.parallelize_mlp(ref)
    x = tokens()
    mine, theirs = ours.state_dict(), ref.state_dict()
    with torch.no_grad():
        logits = ours(x).logits
        same_logits = torch.equal(logits, ref(x).logits) and rel_err(logits, dense(x).logits) < 1e-5
    return {
        "gathered in Phi-3's layout": gathered,
        "plain from_pretrained reads it": all(torch.equal(v, dense.state_dict()[k]) for k, v in plain.state_dict().items()),
        "from_pretrained reads the two blocks": list(mine) == list(theirs)
        and all(torch.equal(v, theirs[k]) for k, v in mine.items()),
        "logits": same_logits,
    }


@pytest.mark.timeout(150)
def test_save_and_from_pretrained_in_phi3_layout(tmp_path):
    """At W=3: full_state_dict gives the dense [2I, H] gate_up_proj (bitwise), save_pretrained with it writes a
    checkpoint transformers loads as it is, and tp_ffn.hf.from_pretrained reads each rank's two row blocks
    from it: bitwise what from_pretrained + parallelize_mlp hold, and its logits (float32: those of the dense
    model but for the order of the sums across ranks, 1e-5)."""
    for rank, got in enumerate(run_ranks(3, _save_and_load, str(tmp_path), timeout=130)):
        assert all(got.values()), (rank, got)


def test_missing_gate_up_weight_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _phi3(torch.float32).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.gate_up_proj.weight"},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks 1 MLP weights of the model: \['model.layers.1.mlp.gate_up_proj.weight'\]"):
        tphf.from_pretrained(transformers.Phi3ForCausalLM, tmp_path)


def test_bad_phi3_mlp_is_left_as_it_was():
    model = _phi3()
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(I + 1, 32, bias=False, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight: expected shape \(32, 37\)"):
        tphf.parallelize_mlp(model)
    assert not any(isinstance(m, Phi3ParallelMLP) for m in model.modules())
