"""Dense state dicts in Meta and Hugging Face naming: loading, sharding, gathering, and errors."""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import FeedForward, ParallelFeedForward
from tp_ffn.checkpoint import META_TO_HF


def _hf(sd: dict) -> dict:
    return {f"{META_TO_HF[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in sd.items()}


def _roundtrip(rank: int, world: int) -> dict:
    torch.manual_seed(3)
    dense = FeedForward(20, 37, bias=True, activation="gelu")
    x = torch.randn(4, 20)
    out = {}
    for style, sd in (("meta", dense.state_dict()), ("hf", _hf(dense.state_dict()))):
        torch.manual_seed(99)  # different weights, then overwritten by the load
        par = ParallelFeedForward(20, 37, bias=True, activation="gelu")
        par.load_dense_state_dict(sd)
        gathered = par.dense_state_dict()
        out[style] = {
            "keys": list(gathered),
            "equal": all(torch.equal(gathered[k], v) for k, v in dense.state_dict().items()),
            "output": rel_err(par(x), dense(x)),
            "from_dense": rel_err(ParallelFeedForward.from_dense(sd, activation="gelu")(x), dense(x)),
        }
    out["from_dense module keeps activation"] = ParallelFeedForward.from_dense(dense).activation
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [1, 3])
def test_load_and_gather_both_namings(world):
    for got in run_ranks(world, _roundtrip):
        assert got.pop("from_dense module keeps activation") == "gelu"
        for style, r in got.items():
            assert r["keys"] == ["w1.weight", "w1.bias", "w2.weight", "w2.bias", "w3.weight", "w3.bias"]
            assert r["equal"], style
            assert r["output"] < 1e-5 and r["from_dense"] < 1e-5, (style, r)


def test_feedforward_from_state_dict_both_namings():
    torch.manual_seed(0)
    dense = FeedForward(8, 12, activation="relu")
    x = torch.randn(3, 8)
    for sd in (dense.state_dict(), _hf(dense.state_dict())):
        ffn = FeedForward.from_state_dict(sd, activation="relu")
        assert (ffn.dim, ffn.hidden_dim, ffn.w1.bias) == (8, 12, None)
        assert torch.equal(ffn(x), dense(x))
        assert ffn.w1.weight.data_ptr() != dense.w1.weight.data_ptr()  # copied, not aliased


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda sd: sd.pop("up_proj.weight"), r"missing keys \['up_proj.weight'\]"),
        (lambda sd: sd.update({"up_proj.bias": torch.zeros(12)}), r"unexpected keys \['up_proj.bias'\]"),
        (
            lambda sd: sd.update({"down_proj.weight": torch.zeros(8, 11)}),
            r"'down_proj.weight'.*expected shape \(8, 12\), got \(8, 11\)",
        ),
        (lambda sd: sd.update({"w2.weight": torch.zeros(8, 12)}), "mix"),
        (lambda sd: sd.update({"mlp.gate_proj.weight": torch.zeros(12, 8)}), "unexpected key 'mlp.gate_proj.weight'"),
        (lambda sd: sd.update({"gate_proj.weight": [[0.0]]}), "expected a torch.Tensor"),
    ],
)
def test_bad_state_dict_is_refused_and_nothing_is_written(mutate, pattern):
    torch.manual_seed(0)
    par = ParallelFeedForward(8, 12)
    before = {k: v.clone() for k, v in par.state_dict().items()}
    sd = _hf(FeedForward(8, 12).state_dict())
    mutate(sd)
    with pytest.raises((ValueError, TypeError), match=pattern):
        par.load_dense_state_dict(sd)
    assert all(torch.equal(par.state_dict()[k], v) for k, v in before.items())
    with pytest.raises((ValueError, TypeError), match=pattern.split(".*")[0]):
        FeedForward.from_state_dict(sd)


def test_from_dense_rejects_other_objects():
    with pytest.raises(TypeError, match="ffn_or_state_dict"):
        ParallelFeedForward.from_dense(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ffn_or_state_dict.*w1.weight"):
        ParallelFeedForward.from_dense({"w2.weight": torch.zeros(2, 2)})
