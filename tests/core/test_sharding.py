"""tp_ffn.sharding.ShardSpec against hand-computed slices, and the layers that publish one.

The expected blocks below are written out by hand (not computed with shard_bounds), for uneven
sizes at world sizes 1-4: a fused gate/up weight ``[2I, H]`` (two row blocks), a stacked expert
gate/up ``[E, 2I, H]`` (two blocks along dim 1) and a stacked expert down ``[E, H, I]`` (dim 2).
"""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import ColumnParallelLinear, FeedForward, ParallelFeedForward, RowParallelLinear, ShardSpec
from tp_ffn.comm import all_gather_shard
from tp_ffn.diagnostics import count_collectives
from tp_ffn.sharding import named_shard_specs, piece_bounds, shard_sizes, shard_spec_of

I, H, E = 7, 3, 2  # I = 7 is uneven over 2, 3 and 4

# rank r's [s, e) of I = 7 over W ranks (torch.tensor_split: the first 7 % W ranks hold one more).
HAND = {
    1: [(0, 7)],
    2: [(0, 4), (4, 7)],
    3: [(0, 3), (3, 5), (5, 7)],
    4: [(0, 2), (2, 4), (4, 6), (6, 7)],
}


def _full(*shape: int) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fused_gate_up_is_two_row_blocks(world):
    full = _full(2 * I, H)
    for rank, (s, e) in enumerate(HAND[world]):
        spec = ShardSpec.split((2 * I, H), 0, rank, world, parts=(I, I))
        assert spec.blocks == ((s, e), (I + s, I + e))
        want = torch.cat([full[s:e], full[I + s : I + e]])  # gate rows, then up rows
        assert spec.local_shape == tuple(want.shape) == (2 * (e - s), H)
        assert torch.equal(spec.take(full), want)
        assert spec.ranges() == [(s, e, 0), (I + s, I + e, e - s)]
        out = torch.zeros_like(full)
        spec.place(want, out)
        mask = torch.zeros(2 * I, dtype=torch.bool)
        mask[s:e] = mask[I + s : I + e] = True
        assert torch.equal(out[mask], full[mask]) and not out[~mask].any()
    assert ShardSpec.split((2 * I, H), 0, 0, world, parts=(I, I)).rank_sizes == [2 * (e - s) for s, e in HAND[world]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_stacked_experts_are_blocks_along_their_own_dims(world):
    gate_up, down = _full(E, 2 * I, H), _full(E, H, I)
    for rank, (s, e) in enumerate(HAND[world]):
        gu = ShardSpec.split((E, 2 * I, H), 1, rank, world, parts=(I, I))
        assert gu.blocks == ((s, e), (I + s, I + e))
        want = torch.cat([gate_up[:, s:e], gate_up[:, I + s : I + e]], 1)
        assert gu.local_shape == (E, 2 * (e - s), H) and torch.equal(gu.take(gate_up), want)
        dn = ShardSpec.split((E, H, I), -1, rank, world)
        assert dn.dim == 2 and dn.blocks == ((s, e),)
        assert dn.local_shape == (E, H, e - s) and torch.equal(dn.take(down), down[:, :, s:e])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("shape", "dim", "parts"), [((2 * I, H), 0, (I, I)), ((E, 2 * I, H), 1, (I, I)),
                                                     ((E, H, I), 2, None), ((H, 3 * I), 1, (I, 2 * I))])  # fmt: skip
def test_gather_order_puts_every_block_back(world, shape, dim, parts):
    """What an all-gather along dim hands back (every rank's local tensor, in rank order) assembles to the full."""
    full = _full(*shape)
    specs = [ShardSpec.split(shape, dim, r, world, parts) for r in range(world)]
    gathered = torch.cat([sp.take(full) for sp in specs], dim)
    assert torch.equal(specs[0].assemble(gathered), full)
    # Along another dim (an activation): the same blocks, moved.
    moved = torch.cat([sp.take(full).movedim(dim, -1) for sp in specs], -1)
    assert torch.equal(specs[0].assemble(moved, -1), full.movedim(dim, -1))


def test_boxes_place_a_second_cut():
    """An FSDP-style cut of dim 0 of the local tensor, placed in the full one."""
    # Row-parallel [5, 7] at W=3, rank 1: columns [3, 5); dp piece rows [2, 4) of the local [5, 2].
    spec = ShardSpec.split((5, 7), 1, 1, 3)
    assert spec.boxes((2, 0), (2, 2)) == [((2, 3), (2, 2), (2, 0))]
    # Fused gate/up [14, 3] at W=2, rank 1: local rows [0, 3) are [4, 7), [3, 6) are [11, 14).
    fused = ShardSpec.split((2 * I, H), 0, 1, 2, parts=(I, I))
    assert fused.boxes((2, 0), (2, 3)) == [((6, 0), (1, 3), (2, 0)), ((11, 0), (1, 3), (3, 0))]
    assert fused.boxes((0, 0), (3, 3)) == [((4, 0), (3, 3), (0, 0))]
    assert fused.boxes((6, 0), (0, 3)) == [((14, 0), (0, 3), (6, 0))]  # nothing: placed where it would start
    assert fused.boxes((1, 0), (0, 3)) == [((5, 0), (0, 3), (1, 0))]
    rep = ShardSpec.replicated((4, 4))
    assert rep.boxes((1, 0), (3, 4)) == [((1, 0), (3, 4), (1, 0))] and not rep.is_sharded


def test_bad_descriptions_name_the_number():
    with pytest.raises(ValueError, match=r"parts adding up to shape\[0\]=14, got \(7, 6\)"):
        ShardSpec.split((2 * I, H), 0, 0, 2, parts=(7, 6))
    with pytest.raises(ValueError, match=r"0 <= rank < world=2, got 2"):
        ShardSpec.split((I,), 0, 2, 2)
    with pytest.raises(ValueError, match=r"dim: expected None or a dim of shape \(7,\), got 1"):
        ShardSpec.split((I,), 1, 0, 1)
    with pytest.raises(ValueError, match=r"full: expected the full shape \(14, 3\), got \(7, 3\)"):
        ShardSpec.split((2 * I, H), 0, 0, 2, parts=(I, I)).take(torch.zeros(I, H))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_other_layouts_of_stacked_experts_come_from_the_spec(world):
    """One expert of a stacked spec (select) and w1 + w3 joined (cat) hold, by hand, the rows the layer holds."""
    w1 = _full(E, I, H)
    for rank, (s, e) in enumerate(HAND[world]):
        stacked = ShardSpec.split((E, I, H), 1, rank, world)
        one = stacked.select(0)
        assert (one.shape, one.dim, one.blocks) == ((I, H), 0, ((s, e),))
        assert torch.equal(one.take(w1[1]), w1[1, s:e])
        down = ShardSpec.split((E, H, I), 2, rank, world).select(-3)
        assert (down.shape, down.dim, down.blocks) == ((H, I), 1, ((s, e),))
        fused = ShardSpec.cat([stacked, stacked])
        assert fused == ShardSpec.split((E, 2 * I, H), 1, rank, world, parts=(I, I))
        assert fused.blocks == ((s, e), (I + s, I + e))
        gate, up = fused.take_blocks(torch.cat([w1, -w1], 1))
        assert torch.equal(gate, w1[:, s:e]) and torch.equal(up, -w1[:, s:e])
    assert ShardSpec.replicated((E, H)).select(0) == ShardSpec.replicated((H,))
    with pytest.raises(ValueError, match=r"select: dim 1 is the split dim"):
        ShardSpec.split((E, I, H), 1, 0, world).select(1)
    with pytest.raises(ValueError, match=r"cat: expected specs split along one dim, alike elsewhere"):
        ShardSpec.cat([ShardSpec.split((E, I, H), 1, 0, 2), ShardSpec.split((E, I, H + 1), 1, 0, 2)])


def test_piece_bounds_of_any_sizes():
    assert [piece_bounds([3, 0, 2], r) for r in range(3)] == [(0, 3), (3, 3), (3, 5)]
    for world in (1, 2, 3, 4):  # tensor_split sizes: the same as shard_bounds
        assert [piece_bounds(shard_sizes(I, world), r) for r in range(world)] == HAND[world]


# --------------------------------------------------------------------------------------------------
# What the layers publish, and a layer holding two blocks against nn.Linear


def test_layers_publish_their_specs():
    col, row = ColumnParallelLinear(5, I), RowParallelLinear(I, 5)
    assert col.shard_spec("weight") == ShardSpec.split((I, 5), 0, 0, 1)
    assert col.shard_spec("bias") == ShardSpec.split((I,), 0, 0, 1)
    assert row.shard_spec("weight") == ShardSpec.split((5, I), 1, 0, 1)
    assert row.shard_spec("bias") == ShardSpec.replicated((5,))
    ffn = ParallelFeedForward(5, I)
    specs = named_shard_specs(torch.nn.ModuleDict({"ffn": ffn, "norm": torch.nn.LayerNorm(5)}))
    assert specs["ffn.w2.weight"].dim == 1 and specs["ffn.w1.weight"].dim == 0
    assert specs["norm.weight"] == ShardSpec.replicated((5,))
    assert shard_spec_of(ffn, "w3.weight") == ffn.w3.shard_spec("weight")
    with pytest.raises(KeyError, match="no parameter 'bias'"):
        ColumnParallelLinear(5, I, bias=False).shard_spec("bias")
    fused = ColumnParallelLinear(5, 2 * I, parts=(I, I))
    with pytest.raises(ValueError, match=r"holds 2 blocks"):
        fused.start  # noqa: B018 - one [start, end) cannot describe two blocks
    with pytest.raises(ValueError, match=r"input_is_parallel: expected True with several parts"):
        RowParallelLinear(2 * I, 5, parts=(I, I))


def _fused_case(rank: int, world: int) -> tuple[dict[str, float], dict, dict]:
    """A column-parallel fused gate/up [2I, H] (parts (I, I)) and a row-parallel layer on its halves,
    against nn.Linear in float64: init, outputs, gradients, the gathered weight, the collectives."""
    torch.manual_seed(3)
    dense = torch.nn.Linear(H, 2 * I, dtype=torch.float64)
    torch.manual_seed(3)
    fused = ColumnParallelLinear(H, 2 * I, gather_output=False, parts=(I, I), dtype=torch.float64)
    gathered = ColumnParallelLinear(H, 2 * I, gather_output=True, parts=(I, I), dtype=torch.float64)
    spec = fused.shard_spec("weight")
    (s, e), n = spec.blocks[0], spec.blocks[0][1] - spec.blocks[0][0]
    x = torch.randn(2, 3, H, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y_ref = dense(xr)
    g_ref, u_ref = y_ref[..., :I], y_ref[..., I:]
    (g_ref * u_ref).sum().backward()
    xl = x.clone().requires_grad_()
    with count_collectives() as fwd:
        y = fused(xl)
    g, u = y[..., :n], y[..., n:]  # this rank's gate columns, then its up columns
    with count_collectives() as bwd:
        (g * u).sum().backward()
    gathered.load_state_dict({k: v.detach() for k, v in fused.state_dict().items()})
    out = {
        "init": rel_err(fused.weight, spec.take(dense.weight)),
        "bias init": rel_err(fused.bias, fused.shard_spec("bias").take(dense.bias)),
        "gate": rel_err(g, g_ref[..., s:e]),
        "up": rel_err(u, u_ref[..., s:e]),
        "weight grad": rel_err(fused.weight.grad, spec.take(dense.weight.grad)),
        "input grad": rel_err(xl.grad, xr.grad),
        "gather_output": rel_err(gathered(x), y_ref),
        "gathered weight": rel_err(all_gather_shard(fused.weight.detach(), spec, fused.tp.group), dense.weight),
    }
    return out, dict(fwd), dict(bwd)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_two_block_column_layer_matches_nn_linear(world):
    for rank, (got, fwd, bwd) in enumerate(run_ranks(world, _fused_case)):
        bad = {k: v for k, v in got.items() if v > (0 if "init" in k else 1e-12)}
        assert not bad, f"W={world} rank {rank}: {bad}"
        # As a one-block column layer: nothing forward, the input gradient's all-reduce backward.
        assert fwd == {} and bwd == ({"all_reduce": 1} if world > 1 else {}), (fwd, bwd)


def test_dense_block_through_specs_round_trips():
    """load_dense_state_dict / dense_state_dict go through the specs (one process)."""
    torch.manual_seed(0)
    dense = FeedForward(5, I, bias=True)
    par = ParallelFeedForward.from_dense(dense)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in par.dense_state_dict().items())


# --------------------------------------------------------------------------------------------------
# The safetensors reader and the HF adapter's loader / gatherer take any spec (a Phi-3-style fused gate/up)


def test_reader_reads_blocks_along_any_dim(tmp_path, monkeypatch):
    """Every spec above, read chunk by chunk (a chunk of one stored row) from a file, is spec.take(full)."""
    from safetensors.torch import save_file

    from tp_ffn import safetensors_dir

    tensors = {"fused": _full(2 * I, H), "experts.gate_up": _full(E, 2 * I, H), "experts.down": _full(E, H, I)}
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(safetensors_dir, "CHUNK_BYTES", 1)  # one row of dim 0 per open
    files = safetensors_dir.SafetensorsDir(tmp_path)
    for world in (1, 2, 3, 4):
        for rank in range(world):
            for key, dim, parts in (("fused", 0, (I, I)), ("experts.gate_up", 1, (I, I)), ("experts.down", 2, None)):
                spec = ShardSpec.split(tensors[key].shape, dim, rank, world, parts)
                got = files.read(key, spec)
                assert got.dtype == torch.bfloat16 and torch.equal(got.float(), spec.take(tensors[key])), (key, spec)
    with pytest.raises(ValueError, match=r"fused: expected shape \(14, 4\), got \(14, 3\)"):
        files.read("fused", ShardSpec.split((2 * I, 4), 0, 0, 2))


def test_reader_reads_blocks_apart_and_many_tensors_per_open(tmp_path, monkeypatch):
    """A fused gate/up's two blocks straight into two tensors; read_many keeps a file open for reads up to
    CHUNK_BYTES of stored rows, then reopens, as one tensor's chunks do; a wrong piece is refused first."""
    import safetensors
    from safetensors.torch import save_file

    from tp_ffn import safetensors_dir

    experts = {f"experts.{e}.down": _full(H, I) + 100 * e for e in range(E)}
    save_file({"experts.gate_up": _full(E, 2 * I, H), **experts}, str(tmp_path / "model.safetensors"))
    files = safetensors_dir.SafetensorsDir(tmp_path)
    opens = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    for world in (1, 2, 3):
        for rank, (s, e) in enumerate(HAND[world]):
            fused = ShardSpec.split((E, 2 * I, H), 1, rank, world, parts=(I, I))
            w1, w3 = torch.empty(E, e - s, H), torch.empty(E, e - s, H)
            files.read_into("experts.gate_up", [w1, w3], fused)
            assert torch.equal(torch.cat([w1, w3], 1), fused.take(_full(E, 2 * I, H)))
            one = ShardSpec.split((H, I), 1, rank, world)
            outs = [torch.empty(H, e - s, dtype=torch.float64) for _ in range(E)]
            opens.clear()
            files.read_many([(k, [o], one) for k, o in zip(experts, outs)])
            assert len(opens) == 1  # both experts' slices through one open
            assert all(torch.equal(o, one.take(experts[k]).double()) for k, o in zip(experts, outs))
    row_bytes = 4 * I  # an expert's down [H, I] in float32: H rows of I
    monkeypatch.setattr(safetensors_dir, "CHUNK_BYTES", H * row_bytes)  # one expert's rows per open
    opens.clear()
    files.read_many([(k, torch.empty(H, I), None) for k in experts])
    assert len(opens) == E
    with pytest.raises(ValueError, match=r"out: expected one tensor per block of experts.gate_up, shaped"):
        files.read_into("experts.gate_up", [torch.empty(E, 4, H)], ShardSpec.split((E, 2 * I, H), 1, 0, 2, (I, I)))


class _FusedMLP(torch.nn.Module):
    """What a Phi-3-style adapter would hold: ``gate_up_proj [2I, H]`` as two blocks, ``down_proj`` row-parallel."""

    def __init__(self) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": torch.float32, "device": "meta"}
        self.gate_up_proj = ColumnParallelLinear(H, 2 * I, gather_output=False, parts=(I, I), **kw)
        self.down_proj = RowParallelLinear(I, H, input_is_parallel=True, **kw)


def _hf_load_and_gather(rank: int, world: int, root: str) -> dict[str, float]:
    import tp_ffn.hf as tphf
    from tp_ffn.hf.loading import _load
    from tp_ffn.safetensors_dir import SafetensorsDir

    model = torch.nn.Module()
    model.mlp = _FusedMLP()
    _load(model, SafetensorsDir(root), torch.device("cpu"))
    full = {"mlp.gate_up_proj.weight": _full(2 * I, H), "mlp.down_proj.weight": _full(H, I)}
    sd = tphf.full_state_dict(model)
    out = {f"gathered {k}": rel_err(sd[k], v) for k, v in full.items()}
    for name in ("gate_up_proj", "down_proj"):
        layer = getattr(model.mlp, name)
        out[f"loaded {name}"] = rel_err(layer.weight, layer.shard_spec("weight").take(full[f"mlp.{name}.weight"]))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_hf_loader_and_gatherer_take_a_two_block_layer(tmp_path, world):
    from safetensors.torch import save_file

    save_file({"mlp.gate_up_proj.weight": _full(2 * I, H), "mlp.down_proj.weight": _full(H, I)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    for rank, got in enumerate(run_ranks(world, _hf_load_and_gather, str(tmp_path))):
        assert all(v == 0 for v in got.values()), f"W={world} rank {rank}: {got}"
