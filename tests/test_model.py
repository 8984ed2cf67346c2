"""The Llama model at TP = 1, 2 and 4 (with and without sequence parallelism) against TP = 1."""

from __future__ import annotations

import pytest
import torch

from rankpool import run_ranks
from reference import rel_err
from tp_ffn.models import PRESETS, LlamaConfig, Transformer

CFG = PRESETS["tiny"].updated(n_heads=8, n_kv_heads=4, max_seq_len=64)  # GQA, splits over 4 ranks


def _full_grad(model: Transformer, name: str, p: torch.nn.Parameter) -> torch.Tensor:
    from tp_ffn.comm import all_gather_along

    module = model.get_submodule(name.rsplit(".", 1)[0])
    dim = getattr(module, "shard_dim", None)
    if dim is None or (dim == 1 and name.endswith("bias")):
        return p.grad
    return all_gather_along(p.grad, model.tp.group, dim, module.shard_sizes)


def _model_run(rank: int, world: int, sp: bool, ffn_modes: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = Transformer(CFG, sequence_parallel=sp, dtype=torch.float64, **(ffn_modes or {}))
    tokens = torch.randint(0, CFG.vocab_size, (2, 16))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: _full_grad(model, n, p).clone() for n, p in model.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world, sp, ffn_modes",
    [
        (2, False, {}),
        (2, True, {}),
        (4, True, {}),
        # The feed-forward execution modes reach every block (train.py's --ffn-* flags).
        (2, False, {"fuse_gate_up": True, "overlap_comm": False, "comm_chunks": 3}),
        (4, True, {"fuse_gate_up": True}),
    ],
)
def test_tp_matches_tp1(world, sp, ffn_modes):
    ref = run_ranks(1, _model_run, False)[0]
    for rank, got in enumerate(run_ranks(world, _model_run, sp, ffn_modes)):
        assert rel_err(got["logits"], ref["logits"]) < 1e-10, rank
        assert abs(got["loss"] - ref["loss"]) < 1e-10
        bad = {n: rel_err(g, ref["grads"][n]) for n, g in got["grads"].items() if rel_err(g, ref["grads"][n]) > 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def test_config_errors():
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) must both be divisible.*tp=4"):
        Transformer(PRESETS["tiny"]).cfg.check_tp(4)
    with pytest.raises(ValueError, match=r"dim \(100\) must be divisible by n_heads \(8\)"):
        LlamaConfig(dim=100, n_heads=8)
    with pytest.raises(ValueError, match="unknown fields"):
        PRESETS["tiny"].updated(layers=3)
    assert PRESETS["llama2-7b"].hidden_dim == 11008 and PRESETS["llama3-8b"].hidden_dim == 14336
    assert round(PRESETS["llama3-8b"].num_params() / 1e9, 2) == 8.03
    assert round(PRESETS["gpt2-small"].num_params() / 1e6, 1) == 134.1
    small = Transformer(PRESETS["gpt2-small"], device="meta")
    assert sum(p.numel() for p in small.parameters()) == PRESETS["gpt2-small"].num_params()
    meta = Transformer(PRESETS["llama2-7b"], device="meta")
    assert sum(p.numel() for p in meta.parameters()) == PRESETS["llama2-7b"].num_params()


def test_ffn_modes_reach_every_block():
    model = Transformer(CFG, fuse_gate_up=True, overlap_comm=False, comm_chunks=2, device="meta")
    modes = {
        (b.feed_forward.fuse_gate_up, b.feed_forward.overlap_comm, b.feed_forward.comm_chunks) for b in model.layers
    }
    assert modes == {(True, False, 2)}
    # Same parameters, names and shapes as the default modes: checkpoints carry over.
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(model) == shapes(Transformer(CFG, device="meta"))
    with pytest.raises(ValueError, match="comm_chunks"):
        Transformer(CFG, comm_chunks=0, device="meta")
