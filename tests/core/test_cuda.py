"""The equivalence suite on a CUDA device: marker ``cuda``, skipped without one.

``benchmarks/gpu_check.sh`` runs these (``pytest -m cuda``) on the GPU machine. Checked there:
ParallelFeedForward on CUDA against the float64 dense reference (on the CPU) and against the
``pretraining_tp`` emulation on CUDA, in fp32 and bf16, in every mode, at world size 1 in this
process and at world size 2 with both ranks on ``cuda:0`` through gloo; initialisation on CUDA
equal to the CPU's bit for bit; bf16 autocast; inductor (``torch.compile``) against eager, with
the two-tensor memory target measured under compile.

Tolerances (relative, Frobenius): fp32 1e-5 against float64, as the CPU suites (cuBLAS sums in
another order than the CPU, still a few ulps of fp32; TF32 is switched off for these tests, it
would give ~1e-3); bf16 3e-2 (a few ulps of bf16's 8-bit mantissa over sums of ~100 terms), as
benchmarks/parity.py. A wrong weight is seen in both (negative control in
``test_check_sees_a_wrong_weight``: w2 off by 10% gives an error of 0.1).
"""

from __future__ import annotations

import pytest
import torch
from support.rankpool import run_ranks
from support.reference import dense64, rel_err

from tp_ffn import FeedForward, ParallelFeedForward, emulate_pretraining_tp, split_sequence
from tp_ffn.diagnostics import saved_for_backward

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DIM, HIDDEN, BATCH, SEQ = 64, 173, 2, 16  # 173 is uneven over 2 and 3
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
MODES = {
    "reference": {"fuse_gate_up": False, "overlap_comm": False},
    "overlap (default)": {},
    "fused": {"fuse_gate_up": True, "overlap_comm": False},
    "fused+overlap": {"fuse_gate_up": True},
    "chunked": {"comm_chunks": 3},
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _reference(seed: int, activation: str, bias: bool) -> tuple[FeedForward, torch.Tensor, torch.Tensor, dict]:
    """The dense block (CPU, fp32), an input and output gradient, and the float64 results."""
    torch.manual_seed(seed)
    dense = FeedForward(DIM, HIDDEN, bias=bias, activation=activation)
    x, gy = torch.randn(BATCH, SEQ, DIM), torch.randn(BATCH, SEQ, DIM)
    ref = dense64(dense)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.backward(gy.double())
    want = {"output": y64, "input grad": x64.grad, **{k: p.grad for k, p in ref.named_parameters()}}
    return dense, x, gy, want


def _errors(
    dense: FeedForward, x: torch.Tensor, gy: torch.Tensor, want: dict, dtype: torch.dtype, options: dict
) -> dict[str, float]:
    """ParallelFeedForward (world of one) on CUDA in ``dtype`` against float64 and the emulation."""
    sd = {k: v.to(dtype) for k, v in dense.state_dict().items()}
    par = ParallelFeedForward.from_dense(sd, activation=dense.activation, device="cuda", **options)
    xc = x.to("cuda", dtype).requires_grad_()
    y = par(xc)
    y.backward(gy.to("cuda", dtype))
    got = {"output": y, "input grad": xc.grad, **{k: p.grad for k, p in par.named_parameters()}}
    emu = FeedForward.from_state_dict({k: v.cuda() for k, v in sd.items()}, activation=dense.activation)
    xe = x.to("cuda", dtype).requires_grad_()
    ye = emulate_pretraining_tp(emu, xe, 3)
    ye.backward(gy.to("cuda", dtype))
    emulated = {"output": ye, "input grad": xe.grad}
    out = {name: rel_err(got[name].cpu(), want[name]) for name in want}
    out.update({f"{name} vs emulation": rel_err(got[name].cpu(), emulated[name].cpu()) for name in emulated})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_dense_and_emulation_on_cuda(mode, dtype):
    failures = []
    for activation in ACTIVATIONS:
        for bias in (False, True):
            dense, x, gy, want = _reference(1, activation, bias)
            for name, err in _errors(dense, x, gy, want, dtype, MODES[mode]).items():
                if err > TOL[dtype]:
                    failures.append(f"{activation} bias={bias} {name}: rel err {err:.2e} > {TOL[dtype]}")
    assert not failures, "\n".join(failures)


def test_check_sees_a_wrong_weight():
    """Negative control: w2 scaled by 1.1 fails the check in fp32 and in bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        dense, x, gy, want = _reference(1, "silu", True)
        with torch.no_grad():
            dense.w2.weight.mul_(1.1)
        assert _errors(dense, x, gy, want, dtype, {})["output"] > 10 * TOL[torch.bfloat16]


def test_init_on_cuda_equals_cpu():
    """The shards drawn on CUDA are, bit for bit, the CPU dense block's (the generator is the CPU's)."""
    for bias, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        torch.manual_seed(42)
        par = ParallelFeedForward(DIM, HIDDEN, bias=bias, dtype=dtype, device="cuda")
        torch.manual_seed(42)
        dense = FeedForward(DIM, HIDDEN, bias=bias, dtype=dtype)
        for k, v in par.state_dict().items():
            assert v.is_cuda and torch.equal(v.cpu(), dense.state_dict()[k]), (bias, dtype, k)


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_bf16_on_cuda(mode):
    """bf16 autocast over fp32 weights: bf16 output, fp32 gradients, within bf16 rounding of the
    dense block under the same autocast."""
    torch.manual_seed(2)
    dense = FeedForward(DIM, HIDDEN, bias=True).cuda()
    par = ParallelFeedForward.from_dense(dense, **MODES[mode])
    x = torch.randn(BATCH, SEQ, DIM, device="cuda")
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yd, yp = dense(xd), par(xp)
    yd.float().sum().backward()
    yp.float().sum().backward()
    assert yp.dtype == yd.dtype == torch.bfloat16
    assert xp.grad.dtype == par.w1.weight.grad.dtype == par.w2.weight.grad.dtype == torch.float32
    assert rel_err(yp, yd) < 2e-2 and rel_err(xp.grad, xd.grad) < 2e-2
    assert rel_err(par.w2.weight.grad, dense.w2.weight.grad) < 2e-2


@pytest.mark.parametrize("mode", ["overlap (default)", "fused+overlap"])
def test_compiled_matches_eager_on_cuda(mode):
    """Inductor against eager (fp32 1e-5; bf16 autocast 2e-2), one graph, and the compiled block
    still keeps at most dim + 2 n_r elements per token for backward."""
    import torch._dynamo as dynamo

    torch.manual_seed(3)
    par = ParallelFeedForward.from_dense(FeedForward(DIM, HIDDEN, bias=True), device="cuda", **MODES[mode])
    x = torch.randn(BATCH, SEQ, DIM, device="cuda")
    dynamo.reset()
    compiled = torch.compile(par, fullgraph=True)
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            ye = par(xe)
            ye.float().sum().backward()
            eager_grad = par.w1.weight.grad.clone()
            par.zero_grad()
            with saved_for_backward(par.parameters()) as saved:
                yc = compiled(xc)
            yc.float().sum().backward()
        assert rel_err(yc, ye) < tol and rel_err(xc.grad, xe.grad) < tol, autocast
        assert rel_err(par.w1.weight.grad, eager_grad) < tol, autocast
        par.zero_grad()
        if not autocast:  # fp32: nothing but x, g and u (the weights are excluded)
            assert saved.numel <= BATCH * SEQ * (DIM + 2 * HIDDEN), saved.numel / (BATCH * SEQ)


def _two_ranks_on_one_gpu(rank: int, world: int, sp: bool, dtype: torch.dtype) -> dict[str, float]:
    """Both ranks on cuda:0 (gloo moves the data through the host). Each rank's output (its
    sequence shard under SP), input gradient and shard gradients against the float64 slices."""
    torch.cuda.set_device(0)
    dense, x, gy, want = _reference(5, "silu", True)
    sd = {k: v.to(dtype) for k, v in dense.state_dict().items()}
    par = ParallelFeedForward.from_dense(sd, device="cuda:0", sequence_parallel=sp)
    s, e = par.w1.start, par.w1.end
    for name, full in (("w1", sd["w1.weight"][s:e]), ("w2", sd["w2.weight"][:, s:e]), ("w3", sd["w3.weight"][s:e])):
        assert torch.equal(getattr(par, name).weight.cpu(), full), name
    group = par.tp.group
    shard = (lambda t: split_sequence(t, group)) if sp else (lambda t: t)  # a local split: no collective
    xl = shard(x).to("cuda:0", dtype).requires_grad_()
    y = par(xl)
    y.backward(shard(gy).to("cuda:0", dtype))
    slices = {
        "output": shard(want["output"]),
        "input grad": shard(want["input grad"]),
        "w1.weight": want["w1.weight"][s:e],
        "w2.weight": want["w2.weight"][:, s:e],
        "w3.weight": want["w3.weight"][s:e],
        "w2.bias": want["w2.bias"],
    }
    got = {"output": y, "input grad": xl.grad, **{k: p.grad for k, p in par.named_parameters()}}
    return {name: rel_err(got[name].cpu(), ref) for name, ref in slices.items()}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_two_ranks_on_one_gpu_through_gloo(sp, dtype):
    try:
        per_rank = run_ranks(2, _two_ranks_on_one_gpu, sp, dtype, timeout=160)
    except RuntimeError as e:
        # gloo carries CUDA tensors for some collectives only (all-reduce for certain); SP also
        # needs all-gather and reduce-scatter on them.
        if sp and "gloo" in str(e).lower() and ("support" in str(e).lower() or "cuda" in str(e).lower()):
            pytest.skip(f"gloo in this torch has no CUDA all-gather / reduce-scatter: {str(e)[-300:]}")
        raise
    for rank, errs in enumerate(per_rank):
        bad = {k: v for k, v in errs.items() if v > TOL[dtype]}
        assert not bad, f"rank {rank}: {bad}"
