"""MFU: the model-FLOPs count against PyTorch's FLOP counter, the utilisation's definition, the
GEMM-rate probe, the slow-bf16 decision, and train.py's metrics lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.rankpool import run_ranks
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tp_ffn import machine
from tp_ffn.models.llama import LlamaConfig, Transformer
from tp_ffn.train.budget.flops import matmul_params, measure_peak, mfu, model_flops_per_token

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64),
        LlamaConfig(dim=48, n_layers=3, n_heads=6, vocab_size=257, multiple_of=1, ffn_dim_multiplier=1.3),
    ],
)
def test_flops_per_token_is_what_the_flop_counter_counts(cfg):
    """Forward + backward of the real model (loss included) under FlopCounterMode equals the
    formula times the tokens. Attention runs on SDPA's math backend here, whose matrix products the
    counter sees (it has no formula for the CPU flash kernel); the math path computes the whole
    score square, as the formula counts it. The token embedding's backward is no GEMM, and it is
    not counted on either side. Negative control: leaving out the output head misses."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    b, s = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counted = counter.get_total_flops()
    assert counted == pytest.approx(model_flops_per_token(cfg, s) * b * s, rel=1e-12)
    without_head = (6 * (matmul_params(cfg) - cfg.dim * cfg.vocab_size) + 12 * cfg.n_layers * cfg.dim * s) * b * s
    assert abs(counted - without_head) > 1e-3 * counted


def test_llama2_7b_flops_per_token():
    """Llama-2-7B (6,738,415,616 parameters): N leaves out the embedding (131 M) and the norms, so
    6 N = 39.6 GFLOP and attention adds 6.4 GFLOP per token at 4096 tokens."""
    from tp_ffn.models.llama import PRESETS

    cfg = PRESETS["llama2-7b"]
    assert matmul_params(cfg) == cfg.num_params() - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
    assert model_flops_per_token(cfg, 4096) == 6 * matmul_params(cfg) + 12 * 32 * 4096 * 4096
    assert cfg.num_params() == 6_738_415_616
    assert model_flops_per_token(cfg, 4096) == pytest.approx(39.64e9 + 6.44e9, rel=1e-3)


def test_mfu_is_all_ranks_flops_over_all_devices_peak():
    # 8 devices of 100 TFLOP/s; a step of 1e15 model FLOPs in 2 s: 5e14 FLOP/s of 8e14.
    assert mfu(1e15, 2.0, 100e12, 8) == pytest.approx(0.625)
    # The same step on twice the devices in the same time is half the utilisation.
    assert mfu(1e15, 2.0, 100e12, 16) == pytest.approx(0.3125)


@pytest.mark.parametrize(
    "bf16, fp32, slow",
    [
        (1.8e9, 79.5e9, True),  # the EPYC without AVX-512: 0.02x
        (117e9, 85e9, False),  # this session's Zen 4 with AVX-512 BF16 (one core)
        (0.25 * 80e9, 80e9, False),  # the boundary counts as fast
        (0.2499 * 80e9, 80e9, True),
    ],
)
def test_bf16_decision(bf16, fp32, slow):
    assert machine.bf16_is_slow(bf16, fp32) is slow


def test_slow_bf16_message_is_one_line_with_both_rates():
    msg = machine.slow_bf16_message(1.8e9, 79.5e9)
    assert "\n" not in msg
    assert "1.8 GFLOP/s" in msg and "79.5 GFLOP/s" in msg and "44x slower" in msg


def test_measure_peak_warns_only_when_bf16_is_slow(monkeypatch):
    rates = {torch.bfloat16: 1.8e9, torch.float32: 79.5e9}
    monkeypatch.setattr(machine, "gemm_rate", lambda dtype, device, **kw: rates[dtype])
    peak, warning = measure_peak(torch.bfloat16, torch.device("cpu"))
    assert peak.flops == 1.8e9 and "bfloat16 GEMM probe" in peak.source
    assert warning is not None and "bfloat16 GEMMs run at 1.8 GFLOP/s" in warning
    rates[torch.bfloat16] = 117e9
    assert measure_peak(torch.bfloat16, torch.device("cpu"))[1] is None
    # float32 asks for no bf16 check; a given peak is taken as it is.
    monkeypatch.setattr(machine, "gemm_rate", lambda *a, **k: pytest.fail("probed although --peak-tflops was given"))
    peak, warning = measure_peak(torch.float32, torch.device("cpu"), given_tflops=2.5)
    assert (peak.flops, peak.source, warning) == (2.5e12, "--peak-tflops", None)


def _probe(rank: int, world: int) -> float:
    return machine.gemm_rate(torch.float32, torch.device("cpu"), max_n=512)


@pytest.mark.timeout(120)
def test_gemm_rate_is_one_number_on_every_rank():
    rates = run_ranks(2, _probe, timeout=100)
    assert rates[0] == rates[1] > 0


def _train(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "scripts/train.py", "--preset", "tiny", "--steps", "2", "--seq-len", "32"]
    cmd += ["--batch-size", "4", "--corpus-bytes", "200000", "--val-every", "0", "--val-sequences", "2"]
    cmd += ["--no-progress", "--metrics", str(metrics), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, [json.loads(ln) for ln in metrics.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_train_metrics_carry_mfu_against_the_named_peak(tmp_path):
    """Every step line has ``mfu`` = model FLOPs of the step / its time / (peak x devices), with the
    peak the header names: given here, so the check is exact."""
    r, lines = _train(tmp_path, "--peak-tflops", "0.5")
    assert "MFU against 0.5 TFLOP/s per device (--peak-tflops)" in r.stdout
    assert re.search(r"memory plan: [\d.]+ GiB per rank \(parameters", r.stdout)
    steps = [ln for ln in lines if "loss" in ln]
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256)
    for ln in steps:
        assert ln["mfu"] == pytest.approx(model_flops_per_token(cfg, 32) * 4 * 32 / ln["time_s"] / 0.5e12)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_train_bf16_on_cpu_probes_and_reports_mfu(tmp_path):
    """The real probe, bf16 on this CPU: MFU in (0, 1] against the bf16 GEMM rate, and a slow-bf16
    warning exactly when the decision says so (on an AVX-512 BF16 or AMX CPU: none)."""
    r, lines = _train(tmp_path, "--dtype", "bfloat16")
    assert re.search(r"MFU against [\d.e+-]+ TFLOP/s per device \(bfloat16 GEMM probe at start-up", r.stdout)
    assert all(0 < ln["mfu"] <= 1 for ln in lines if "loss" in ln)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert "warning: bfloat16 GEMMs" not in r.stdout
