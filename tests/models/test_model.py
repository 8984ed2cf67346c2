"""The Llama model at TP = 1, 2 and 4 (with and without sequence parallelism) against TP = 1."""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------------
# Meta-device initialisation and copies


def _reset_all(model: torch.nn.Module) -> None:
    """PyTorch's recipe after ``to_empty``: ``reset_parameters()`` on every module that has one."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _builders() -> dict:
    from tp_ffn import ColumnParallelLinear, ParallelFeedForward, RowParallelLinear
    from tp_ffn.groups import resolve_group
    from tp_ffn.models.llama import RMSNorm

    return {
        "transformer": lambda d: Transformer(CFG, device=d),
        "transformer fused": lambda d: Transformer(CFG, device=d, fuse_gate_up=True),
        "ffn": lambda d: ParallelFeedForward(16, 41, bias=True, device=d),
        "column": lambda d: ColumnParallelLinear(13, 11, device=d),
        "row": lambda d: RowParallelLinear(13, 11, device=d),
        "rmsnorm": lambda d: RMSNorm(16, 1e-5, resolve_group(None), False, device=d),
        "embedding": lambda d: torch.nn.Embedding(256, 16, device=d),
    }


def _meta_init(rank: int, world: int) -> dict[str, list[str]]:
    """For each module: what differs between a direct build and meta + to_empty + reset, same seed."""
    out = {}
    for name, build in _builders().items():
        torch.manual_seed(7)
        direct = build(None)
        rng_direct = torch.get_rng_state()
        lazy = build("meta")
        lazy.to_empty(device="cpu")
        torch.manual_seed(7)
        _reset_all(lazy)
        diffs = [f"{k}" for k, v in direct.state_dict().items() if not torch.equal(v, lazy.state_dict()[k])]
        buffers = dict(lazy.named_buffers())
        diffs += [f"buffer {k}" for k, v in direct.named_buffers() if not torch.equal(v, buffers[k])]
        diffs += [
            f"{type(m).__name__} has parameters but no reset_parameters"
            for m in lazy.modules()
            if any(True for _ in m.parameters(recurse=False)) and not hasattr(m, "reset_parameters")
        ]
        if not torch.equal(rng_direct, torch.get_rng_state()):
            diffs.append("RNG state after init")
        if isinstance(direct, Transformer):
            tokens = torch.randint(0, CFG.vocab_size, (2, 16))
            logits = lazy(tokens)
            if not (logits.isfinite().all() and torch.equal(logits, direct(tokens))):
                diffs.append("logits")
        out[name] = diffs
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
def test_meta_device_init_equals_a_direct_build(world):
    """``to_empty`` wipes the non-persistent rotary tables: the recipe gave NaN logits."""
    for rank, got in enumerate(run_ranks(world, _meta_init)):
        assert not any(got.values()), f"rank {rank}: {got}"


def _copies(rank: int, world: int) -> dict[str, list[str]]:
    """deepcopy and AveragedModel of each module: same group, same outputs and gradients."""
    import copy
    import pickle

    from torch.optim.swa_utils import AveragedModel

    out = {}
    for name in ("transformer", "ffn", "column", "row"):
        torch.manual_seed(3)
        original = _builders()[name](None)
        for how, make in (("deepcopy", copy.deepcopy), ("AveragedModel", AveragedModel)):
            dup = make(original)
            diffs = []
            inner = dup.module if isinstance(dup, AveragedModel) else dup
            if any(m.tp.group is not original.tp.group for m in inner.modules() if hasattr(m, "tp")):
                diffs.append("group not shared")
            if any(a.data_ptr() == b.data_ptr() for a, b in zip(original.parameters(), inner.parameters())):
                diffs.append("parameters shared")
            torch.manual_seed(11)  # the same inputs on every rank: replicated over TP, as the layers expect
            if name == "transformer":
                x = torch.randint(0, CFG.vocab_size, (2, 8))
            else:
                x = torch.randn(2, 8, 13 if name in ("column", "row") else 16)
            results = []
            for module in (original, dup):
                module.zero_grad(set_to_none=True)
                xi = x if name == "transformer" else x.clone().requires_grad_()
                y = module(xi)
                y.square().sum().backward()
                grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
                results.append((y.detach(), grads, None if name == "transformer" else xi.grad))
            (y0, g0, x0), (y1, g1, x1) = results
            if not torch.equal(y0, y1):
                diffs.append("output")
            if len(g0) != len(g1) or not all(torch.equal(a, b) for a, b in zip(g0, g1)):
                diffs.append("parameter gradients")
            if x0 is not None and not torch.equal(x0, x1):
                diffs.append("input gradient")
            out[f"{name} {how}"] = diffs
        try:  # pickling a module bound to a live process group stays refused (spawn never did it)
            pickle.dumps(original)
            out[f"{name} pickle"] = ["pickled a ProcessGroup"]
        except TypeError:
            out[f"{name} pickle"] = []
    return out


@pytest.mark.timeout(120)
def test_copies_share_the_group_and_compute_the_same():
    for rank, got in enumerate(run_ranks(2, _copies)):
        assert not any(got.values()), f"rank {rank}: {got}"


def test_modules_without_a_group_still_pickle():
    import pickle

    from tp_ffn import ParallelFeedForward

    torch.manual_seed(0)
    ffn = ParallelFeedForward(8, 12)
    back = pickle.loads(pickle.dumps(ffn))
    x = torch.randn(3, 8)
    assert torch.equal(back(x), ffn(x)) and back.tp == ffn.tp
