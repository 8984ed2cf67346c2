"""Generation with a key/value cache against full recomputation, at TP 1 and 2, and the sampling filters.

Tolerances. The models are float64. The cached forward computes the same function as the full
forward with different kernels (an explicit mask, queries grouped per kv head instead of keys
repeated), so their logits agree to float64 rounding: a relative error below 1e-12. TP 2 against
TP 1 only changes reduction orders: below 1e-10, as in test_model.py. Greedy and seeded sampling
then pick the same tokens (no float64 near-tie at these sizes). The negative control drops the
rotary offset of the cached positions, which moves the logits by far more than these bounds.
The sampling distributions are checked on 20000 seeded draws against the exact probabilities
within 5 standard deviations (a fixed seed: the check is deterministic, not flaky).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import rel_err
from support.scriptmain import _load_script

from tp_ffn.models import KVCache, LlamaConfig, Transformer
from tp_ffn.train.run import generate as gen_mod
from tp_ffn.train.run.generate import check_sampling, generate, sample_next_token

ROOT = Path(__file__).resolve().parents[2]
# GQA: 4 query heads on 2 kv heads (at TP 2: 2 query heads on 1 kv head per rank). A short window
# (max_seq_len 24) so that generation runs past it.
GQA = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, max_seq_len=24)
MHA = GQA.updated(n_kv_heads=None)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7], [2, 7]]  # different lengths in one batch


def _model(cfg: LlamaConfig, group=None) -> Transformer:
    torch.manual_seed(0)  # the same full weights at any TP size
    return Transformer(cfg, group=group, dtype=torch.float64).eval()


def _stepwise_logits(model: Transformer, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of every position, fed to the cache in ``chunks`` (a prefill, a chunked prefill, single tokens)."""
    cache = model.new_cache(tokens.shape[0])
    out, pos = [], 0
    for n in chunks:
        out.append(model(tokens[:, pos : pos + n], start_pos=pos, cache=cache))
        pos += n
    return torch.cat(out, 1)


def _recording(monkeypatch) -> list[torch.Tensor]:
    """Record the logits generate() picks every token from."""
    seen: list[torch.Tensor] = []
    original = gen_mod.sample_next_token

    def spy(logits, **kw):
        seen.append(logits.clone())
        return original(logits, **kw)

    monkeypatch.setattr(gen_mod, "sample_next_token", spy)
    return seen


# --------------------------------------------------------------------------------------------------
# The cached forward


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_cached_forward_equals_full_forward_at_every_position(cfg):
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        for chunks in ([24], [7, 5] + [1] * 12, [1] * 24, [10, 14]):
            assert rel_err(_stepwise_logits(model, tokens, chunks), full) < 1e-12, chunks
    cache = model.new_cache(3)
    with torch.no_grad():
        model(tokens[:, :4], cache=cache)
    # Each layer caches the kv heads once (not repeated per query head), in the model's dtype.
    assert cache.layers[0].k.shape == (3, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)
    assert cache.layers[0].k.dtype == torch.float64


def test_negative_control_wrong_rotary_offset(monkeypatch):
    """The comparison above sees a cache whose new positions are rotated as if they started at 0."""
    model = _model(GQA)
    tokens = torch.randint(0, GQA.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        monkeypatch.setattr(Transformer, "rope", lambda self, start_pos, n: (self.rope_cos[:n], self.rope_sin[:n]))
        wrong = _stepwise_logits(model, tokens, [6] + [1] * 10)
    assert rel_err(wrong[:, :6], full[:, :6]) < 1e-12  # the prefill itself starts at 0: still right
    assert rel_err(wrong[:, 6:], full[:, 6:]) > 1e-3


def test_cache_and_position_errors():
    model = _model(GQA)
    tokens = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"cache: holds 2 layers x batch 3 x 24 positions; .* batch 2 x 4 positions"):
        model(tokens, cache=model.new_cache(3))
    with pytest.raises(ValueError, match=r"batch 2 x 8 positions; .* batch 2 x 12 positions"):
        model(tokens, start_pos=8, cache=model.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"positions below max_seq_len=24, got \[22, 26\)"):
        model(tokens, start_pos=22)
    with pytest.raises(ValueError, match=r"start_pos: expected an int >= 0, got -1"):
        model(tokens, start_pos=-1)
    with pytest.raises(ValueError, match=r"max_len: expected at most max_seq_len=24, got 25"):
        model.new_cache(2, 25)
    with pytest.raises(ValueError, match=r"KVCache.batch: expected a positive int, got 0"):
        KVCache(2, 0, 8)
    with pytest.raises(TypeError, match="cache: expected a KVCache"):
        model(tokens, cache={})


# --------------------------------------------------------------------------------------------------
# generate(): the cache against full recomputation


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_generate_with_cache_equals_recomputation(cfg, monkeypatch):
    """Greedy and seeded sampling, a batch of prompts of different lengths, 40 tokens past a window of 24."""
    model = _model(cfg)
    seen = _recording(monkeypatch)
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9}):
        outs, logits = {}, {}
        for use_cache in (True, False):
            seen.clear()
            g = torch.Generator().manual_seed(7)
            outs[use_cache] = generate(model, PROMPTS, 40, generator=g, use_cache=use_cache, **kw)
            logits[use_cache] = torch.stack(seen)
        assert outs[True] == outs[False], kw
        assert [len(o) for o in outs[True]] == [40, 40, 40]
        assert rel_err(logits[True], logits[False]) < 1e-12, kw
    # A prompt longer than the window keeps its last max_seq_len tokens, in both.
    long = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    assert generate(model, long, 10, temperature=0) == generate(model, long, 10, temperature=0, use_cache=False)


def test_each_cached_step_runs_one_position(monkeypatch):
    model = _model(GQA)
    lengths: dict[bool, list[int]] = {True: [], False: []}
    use = [True]
    original = Transformer.forward

    def spy(self, tokens, **kw):
        lengths[use[0]].append(tokens.shape[1])
        return original(self, tokens, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    for use[0] in (True, False):
        generate(model, [1, 2, 3, 4, 5], 30, temperature=0, use_cache=use[0])
    # Prompt 5: a prefill of 5, then one position per token until the context fills the window of
    # 24 (at 25 tokens); then the newest 12 are run again from position 0, and one position each.
    assert lengths[True] == [5] + [1] * 19 + [12] + [1] * 9
    # Recomputation runs the whole context every token (the same windows).
    assert lengths[False] == list(range(5, 25)) + list(range(12, 22))


def test_batch_equals_each_prompt_alone():
    model = _model(GQA)
    together = generate(model, PROMPTS, 12, temperature=0)
    assert together == [generate(model, p, 12, temperature=0) for p in PROMPTS]
    # Past the window of 24, with a prompt longer than the window beside short ones.
    long = torch.randint(0, GQA.vocab_size, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    batch = [long, *PROMPTS]
    for use_cache in (True, False):
        together = generate(model, batch, 30, temperature=0, use_cache=use_cache)
        assert together == [generate(model, p, 30, temperature=0, use_cache=use_cache) for p in batch], use_cache


def test_stop_tokens_end_each_sample():
    model = _model(GQA)
    free = generate(model, PROMPTS, 20, temperature=0)
    stop = free[1][5]
    got = generate(model, PROMPTS, 20, temperature=0, stop_tokens={stop})
    for f, g in zip(free, got):
        assert g == (f[: f.index(stop)] if stop in f else f)
    assert len(got[1]) <= 5


def _tp_rank(rank: int, world: int, cfg: LlamaConfig) -> dict:
    import torch.distributed as dist

    model = _model(cfg, dist.group.WORLD)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    kv_heads = cache.layers[0].k.shape[1]
    out: dict = {"kv_heads": kv_heads}
    seen: list[torch.Tensor] = []
    original = gen_mod.sample_next_token

    def spy(logits, **kw):
        seen.append(logits.clone())
        # Each rank draws with its own seed: only rank 0's token may count (it is broadcast).
        return original(logits, **{**kw, "generator": torch.Generator().manual_seed(100 + rank)})

    gen_mod.sample_next_token = spy
    try:
        for use_cache in (True, False):
            for name, kw in (("greedy", {"temperature": 0}), ("sampled", {"temperature": 1.0, "top_p": 0.9})):
                seen.clear()
                out[(name, use_cache)] = generate(model, PROMPTS, 30, use_cache=use_cache, **kw)
                out[(name, use_cache, "logits")] = torch.stack(seen)
    finally:
        gen_mod.sample_next_token = original
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_generate_tp2_equals_tp1(cfg):
    ref = run_ranks(1, _tp_rank, cfg)[0]
    assert ref[("greedy", True)] == ref[("greedy", False)] and ref[("sampled", True)] == ref[("sampled", False)]
    for rank, got in enumerate(run_ranks(2, _tp_rank, cfg)):
        assert got["kv_heads"] == cfg.kv_heads // 2  # each rank caches its own kv heads
        for name in ("greedy", "sampled"):
            for use_cache in (True, False):
                assert got[(name, use_cache)] == ref[(name, use_cache)], (rank, name, use_cache)
                assert rel_err(got[(name, use_cache, "logits")], ref[(name, use_cache, "logits")]) < 1e-10


# --------------------------------------------------------------------------------------------------
# Sampling


def test_greedy_limits_of_the_filters():
    logits = torch.randn(500, 61, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature=0), greedy)
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_p=1e-9, generator=g), greedy)
    # Control: plain sampling from these logits is not greedy.
    assert not torch.equal(sample_next_token(logits, temperature=1.0, generator=g), greedy)
    model = _model(GQA)
    want = generate(model, PROMPTS, 10, temperature=0)
    assert generate(model, PROMPTS, 10, temperature=1.0, top_k=1, generator=g) == want
    assert generate(model, PROMPTS, 10, temperature=1.5, top_k=0, top_p=1e-9, generator=g) == want
    # None switches a filter off, as 0 (top-k) and 1 (top-p) do.
    for off in ({"top_k": None, "top_p": None}, {"top_k": 0, "top_p": 1.0}):
        g = torch.Generator().manual_seed(5)
        got = sample_next_token(logits, temperature=1.0, generator=g, **off)
        assert torch.equal(got, sample_next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(5)))


P = [0.5, 0.25, 0.15, 0.1]


@pytest.mark.parametrize(
    "kw, want",
    [
        ({"temperature": 1.0}, P),
        ({"temperature": 1.0, "top_k": 2}, [2 / 3, 1 / 3, 0, 0]),
        ({"temperature": 1.0, "top_p": 0.7}, [2 / 3, 1 / 3, 0, 0]),  # 0.5 < 0.7 <= 0.75
        ({"temperature": 1.0, "top_p": 0.8}, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
        ({"temperature": 2.0}, [math.sqrt(p) / sum(math.sqrt(q) for q in P) for p in P]),
        # p^2 = .25, .0625, .0225, .01; top-k 3 renormalises to .746, .187, .067; top-p 0.9 drops the third.
        ({"temperature": 0.5, "top_k": 3, "top_p": 0.9}, [0.8, 0.2, 0, 0]),
    ],
)
def test_sampling_distribution(kw, want):
    n = 20000
    logits = torch.tensor(P, dtype=torch.float64).log().expand(n, -1)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(0), **kw)[:, 0]
    freq = torch.bincount(draws, minlength=len(P)).double() / n
    for f, p in zip(freq.tolist(), want):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (kw, freq.tolist(), want)
    again = sample_next_token(logits, generator=torch.Generator().manual_seed(0), **kw)[:, 0]
    assert torch.equal(draws, again)  # the seed decides the draws


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, r"temperature: expected a number >= 0 \(0: greedy\), got -0.1"),
        ({"temperature": float("nan")}, r"temperature: expected a number >= 0"),
        ({"top_k": -1}, r"top_k: expected an int >= 0 \(0 or None: no top-k filter\), got -1"),
        ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\] \(1 or None: no nucleus filter\), got 0.0"),
        ({"top_p": 1.5}, r"top_p: expected a number in \(0, 1\]"),
    ],
)
def test_sampling_arguments_are_checked(kw, match):
    model = _model(GQA)
    args = {"temperature": 1.0, "top_k": None, "top_p": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        check_sampling(**args)
    with pytest.raises(ValueError, match=match):
        generate(model, [1, 2], 3, **args)


def test_generate_argument_errors():
    model = _model(GQA)
    for prompt, match in (([], "at least one token"), ([[1], []], "at least one token"), ([1, 61], r"\[0, 61\)")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 3)
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 0, got -1"):
        generate(model, [1], -1)
    assert generate(model, [1], 0) == [] and generate(model, [[1], [2, 3]], 0) == [[], []]


def _sp_rank(rank: int, world: int) -> str:
    import torch.distributed as dist

    torch.manual_seed(0)
    model = Transformer(GQA, group=dist.group.WORLD, sequence_parallel=True)
    for call in (
        lambda: generate(model, [1, 2], 3),
        lambda: model(torch.zeros(1, 2, dtype=torch.int64), cache=KVCache(2, 1, 8)),
    ):
        try:
            call()
        except ValueError as e:
            assert "sequence_parallel" in str(e), e
        else:
            raise AssertionError("no error")
    return "ok"


@pytest.mark.timeout(120)
def test_sequence_parallel_model_is_refused():
    assert run_ranks(2, _sp_rank) == ["ok", "ok"]


# --------------------------------------------------------------------------------------------------
# Scripts


@pytest.mark.slow
def test_sample_script_checks_sampling_flags(tmp_path, capsys):
    sample = _load_script("sample")
    assert sample.main(["--ckpt-dir", str(tmp_path), "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error: --top-p: expected a number in (0, 1]") and len(err.splitlines()) == 1
    assert sample.main(["--ckpt-dir", str(tmp_path), "--top-k", "-2"]) == 2
    assert "--top-k: expected an int >= 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_generate_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "benchmarks/bench_generate.py",
        "--preset",
        "tiny",
        "--prompt-len",
        "8",
        "--new-tokens",
        "12",
    ]
    cmd += ["--rounds", "2", "--batch", "2", "--dtype", "float64", "--out", str(tmp_path / "g.json")]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "KV cache" in r.stdout and "recomputed" in r.stdout and "ratio" in r.stdout
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["same_tokens"] is True and result["tp"] == 1
    assert all(v > 0 for v in result["tokens_per_s"].values()) and len(result["rounds"]["ratio"]) == 2
    bad = subprocess.run(
        cmd + ["--new-tokens", "0"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "bench_generate.py: error: --new-tokens: expected a positive int, got 0"
    )
