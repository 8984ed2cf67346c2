"""The two-tensor SwiGLU: what ParallelFeedForward keeps for backward, and that it is still exact.

Memory is measured with ``torch.autograd.graph.saved_tensors_hooks`` (``saved_for_backward``): every
buffer saved for backward counted once, parameters excluded. Target (issue 13): at most
``dim + 2 n_r`` elements per token in every mode, with and without sequence parallelism (where the
token count is the full sequence's: ``g`` and ``u`` span it, and the input kept is the gathered
one). The plain autograd composition of the same layers, which is what ParallelFeedForward ran
before, keeps ``dim + 4 n_r`` and is the negative control in every mode; the dense FeedForward
(untouched) keeps ``dim + 4 hidden``.

Exactness: gradcheck in float64 for every activation, and bit-for-bit equality with autograd's own
derivative of ``act(g) * u`` in fp32 (same ATen backward kernels on the same operands). The block
against the float64 dense reference in every mode is covered by test_ffn_parallel.py and
test_properties.py; compile by test_compile.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from support.rankpool import run_ranks
from support.reference import rel_err

from tp_ffn import FeedForward, ParallelFeedForward, split_sequence, swiglu_kernels
from tp_ffn.diagnostics import saved_for_backward
from tp_ffn.fused import gate_up_projection
from tp_ffn.swiglu import ACTIVATIONS, swiglu, swiglu_linear

DIM, HIDDEN, BATCH, SEQ = 24, 101, 2, 12  # 101 is uneven over 2 ranks (51, 50)
MODES = {
    "reference": {"fuse_gate_up": False, "overlap_comm": False},
    "overlap (default)": {},
    "fused": {"fuse_gate_up": True, "overlap_comm": False},
    "fused+overlap": {"fuse_gate_up": True, "overlap_comm": True},
    "chunked": {"comm_chunks": 3},
    "fused+overlap+chunked": {"fuse_gate_up": True, "comm_chunks": 3},
}


def _autograd_composition(par: ParallelFeedForward, x: torch.Tensor) -> torch.Tensor:
    """What ParallelFeedForward.forward computed before the two-tensor function: the same GEMMs and
    collectives, ``act(g) * u`` and the down projection left to autograd (the negative control)."""
    seq_dim = par.sequence_dim if par.sequence_parallel else None
    g, u = gate_up_projection(
        x, par.w1.weight, par.w3.weight, par.w1.bias, par.w3.bias, par.tp.group,
        sequence_dim=seq_dim, fused=par.fuse_gate_up, overlap=par.overlap_comm,
    )  # fmt: skip
    return par.w2.forward_parallel(par.act(g) * u)


def _kept(rank: int, world: int, sp: bool, bias: bool, seq: int, autocast: bool) -> dict[str, tuple]:
    """Per mode: (bytes kept by the block, by the autograd composition, hidden tokens, n_r, item size)."""
    out = {}
    for mode, options in MODES.items():
        if sp and "comm_chunks" in options:
            continue  # chunking splits an all-reduce; SP has none
        torch.manual_seed(0)
        par = ParallelFeedForward(DIM, HIDDEN, bias=bias, sequence_parallel=sp, **options)
        x = torch.randn(BATCH, seq, DIM)
        x = (split_sequence(x, par.tp.group) if sp else x).requires_grad_()
        kept = []
        for composed in (False, True):
            with (
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
                saved_for_backward(par.parameters()) as saved,
            ):
                y = _autograd_composition(par, x) if composed else par(x)
            y.float().sum().backward()  # what was saved is still there and sufficient
            kept.append(saved.nbytes)
        itemsize = 2 if autocast else 4
        out[mode] = (*kept, BATCH * seq, par.w1.end - par.w1.start, itemsize)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_keeps_input_and_two_hidden_tensors(world, sp):
    """fp32: the bytes kept are exactly those of x (gathered under SP), g and u; the composition
    that autograd builds keeps two hidden-size tensors more, so the same check rejects it."""
    for rank, got in enumerate(run_ranks(world, _kept, sp, sp, SEQ, False)):
        for mode, (kept, composed, tokens, n_r, itemsize) in got.items():
            target = tokens * (DIM + 2 * n_r) * itemsize
            where = f"W={world} rank {rank} {mode}"
            assert kept <= target, f"{where}: kept {kept / itemsize / tokens:.1f} elements/token > dim + 2 n_r"
            # Negative control: the autograd composition keeps act(g) and the product too.
            assert composed == tokens * (DIM + 4 * n_r) * itemsize, (where, composed / itemsize / tokens)
            assert composed > target, where


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
def test_keeps_two_hidden_tensors_under_bf16_autocast(world):
    """bf16 autocast: per token (the difference between two sequence lengths, so the weights' bf16
    copies, which autocast keeps too, cancel) at most dim + 2 n_r bf16 elements."""
    for sp in (False, True):
        short = run_ranks(world, _kept, sp, True, SEQ, True)
        long = run_ranks(world, _kept, sp, True, 2 * SEQ, True)
        for rank, (a, b) in enumerate(zip(short, long)):
            for mode in a:
                (kept_a, comp_a, tok_a, n_r, size), (kept_b, comp_b, tok_b, _, _) = a[mode], b[mode]
                per_token = (kept_b - kept_a) / (tok_b - tok_a) / size
                where = f"W={world} rank {rank} sp={sp} {mode}"
                assert per_token <= DIM + 2 * n_r, (where, per_token)
                assert (comp_b - comp_a) / (tok_b - tok_a) / size >= DIM + 4 * n_r, where  # control


def test_dense_block_keeps_four_hidden_tensors():
    """The meter against a block whose saved set is known: FeedForward (untouched) keeps x once
    (read by w1 and w3), g, act(g), u and the product: dim + 4 hidden per token."""
    torch.manual_seed(0)
    dense = FeedForward(DIM, HIDDEN)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    with saved_for_backward(dense.parameters()) as saved:
        y = dense(x)
    assert saved.numel == BATCH * SEQ * (DIM + 4 * HIDDEN)
    with saved_for_backward() as with_params:
        dense(x)
    assert with_params.numel == saved.numel + 3 * DIM * HIDDEN  # the weights, when not excluded
    y.sum().backward()


def test_meter_counts_buffers_once():
    """A tensor saved twice counts once; a saved view keeps (and counts) its whole buffer."""
    a = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, 6, requires_grad=True)
    with saved_for_backward([w]) as saved:
        y = a @ w + a @ w  # a saved by both GEMMs
    assert saved.numel == a.numel()
    big = torch.randn(8, 6, requires_grad=True)
    with saved_for_backward() as saved:
        b = big * 1.0
        b[:2].sin()  # sin saves a 2-row view of b's 8-row buffer
    assert saved.numel == big.numel()
    y.sum().backward()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradcheck_float64(activation):
    torch.manual_seed(0)
    g, u = (torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    if activation == "relu":  # away from the kink, where the finite difference is meaningless
        with torch.no_grad():
            g.add_(torch.sign(g) * 0.1)
    assert torch.autograd.gradcheck(lambda g, u, w: swiglu_linear(g, u, w, activation), (g, u, w))
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u, activation), (g, u))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_bitwise_equal_to_autograd_composition(activation):
    """fp32 eager: output and every gradient bit for bit those of ``F.linear(act(g) * u, w)`` (silu: the
    fused kernels, 33 columns leaving a tail to ATen's scalar loop)."""
    torch.manual_seed(1)
    g, u = (torch.randn(2, 7, 33, requires_grad=True) for _ in range(2))
    w = torch.randn(9, 33, requires_grad=True)
    dy = torch.randn(2, 7, 9)
    act = ACTIVATIONS[activation]
    want = F.linear(act(g) * u, w)
    want_grads = torch.autograd.grad(want, (g, u, w), dy)
    got = swiglu_linear(g, u, w, activation)
    got_grads = torch.autograd.grad(got, (g, u, w), dy)
    assert torch.equal(got, want)
    for name, a, b in zip(("g", "u", "w"), got_grads, want_grads):
        assert torch.equal(a, b), (activation, name, rel_err(a, b))
    h = swiglu(g, u, activation)
    assert torch.equal(h, act(g) * u)
    for a, b in zip(
        torch.autograd.grad(h, (g, u), dy[..., :1].expand(2, 7, 33)),
        torch.autograd.grad(act(g) * u, (g, u), dy[..., :1].expand(2, 7, 33)),
    ):
        assert torch.equal(a, b), activation
    # Negative control: the derivative of another activation is not bitwise equal.
    other = "gelu" if activation != "gelu" else "silu"
    wrong = torch.autograd.grad(swiglu_linear(g, u, w, other), (g,), dy)[0]
    assert not torch.equal(wrong, want_grads[0])


def test_frozen_inputs_and_autocast_dtypes():
    """Gradients only where asked; under bf16 autocast the output is bf16 and each gradient comes
    back in its input's dtype (fp32 weights keep fp32 gradients)."""
    g, u = torch.randn(5, 8), torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8)
    y = swiglu_linear(g, u, w)
    (du,) = torch.autograd.grad(y.sum(), (u,))
    assert du.shape == u.shape
    g.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_linear(g.bfloat16(), u.bfloat16(), w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and g.grad.dtype == u.grad.dtype == torch.float32
    want = F.linear(F.silu(g.double()) * u.double(), w.double())
    assert rel_err(y, want) < 2e-2


def test_unknown_activation_is_one_clear_error():
    with pytest.raises(ValueError, match="activation: expected one of"):
        swiglu_linear(torch.ones(1, 2), torch.ones(1, 2), torch.ones(3, 2), "tanh")


def _kept_compiled(rank: int, world: int) -> dict[str, tuple]:
    """As :func:`_kept`, the block under torch.compile (inductor): AOTAutograd partitions forward
    and backward anew and decides for itself what to save."""
    import torch._dynamo as dynamo

    out = {}
    cases = {"overlap (default)": {}, "sequence parallel": {"sequence_parallel": True}}
    if world > 1:
        cases["fused+overlap+chunked"] = {"fuse_gate_up": True, "comm_chunks": 3}
    for name, options in cases.items():
        torch.manual_seed(0)
        par = ParallelFeedForward(DIM, HIDDEN, **options)
        x = torch.randn(BATCH, SEQ, DIM)
        x = (split_sequence(x, par.tp.group) if par.sequence_parallel else x).requires_grad_()
        dynamo.reset()
        compiled = torch.compile(par, fullgraph=True)
        with saved_for_backward(par.parameters()) as saved:
            y = compiled(x)
        y.sum().backward()
        out[name] = (saved.numel, BATCH * SEQ, par.w1.end - par.w1.start)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2])
def test_compiled_block_keeps_two_hidden_tensors(world):
    for rank, got in enumerate(run_ranks(world, _kept_compiled, timeout=280)):
        for name, (kept, tokens, n_r) in got.items():
            assert kept <= tokens * (DIM + 2 * n_r), (world, rank, name, kept / tokens, DIM + 2 * n_r)


_CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
)


def compiled_kernels(device: str, activation: str) -> tuple[list[str], list[str]]:
    """The names of the kernels inductor generates for :func:`swiglu_linear`'s forward and its
    backward (C++ kernels on the CPU, Triton on CUDA); GEMMs are library calls, not among them."""
    import re

    import torch._dynamo as dynamo
    from torch._inductor.utils import run_and_get_code

    g, u = (torch.randn(64, 96, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(48, 96, device=device, requires_grad=True)
    dynamo.reset()
    fn = torch.compile(lambda g, u, w: swiglu_linear(g, u, w, activation), fullgraph=True)
    _, (forward, backward) = run_and_get_code(lambda: fn(g, u, w).sum().backward())
    kernel = re.compile(r"^(\w+) = async_compile\.(?:triton|cpp\w*)\(", re.MULTILINE)
    return kernel.findall(forward), kernel.findall(backward)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_compiled_elementwise_is_one_kernel_each_way(device):
    """Under inductor the elementwise work is one kernel forward (act(g) * u) and one backward
    (the recomputed product and both input gradients)."""
    for activation in ("silu", "gelu_tanh"):
        forward, backward = compiled_kernels(device, activation)
        assert len(forward) == 1 and len(backward) == 1, (device, activation, forward, backward)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_swiglu_second_derivative(activation):
    """swiglu() differentiates twice (create_graph=True) where its kernels' derivatives exist: the
    eager backward's out= overloads are used only under no_grad, since they do not differentiate."""
    g, u = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(lambda g, u: swiglu(g, u, activation), (g, u))


def _fused_and_eager(dtype: torch.dtype, rows: int, strided: bool, need: tuple[bool, bool, bool] = (True, True, True)):
    """swiglu_linear's output and gradients twice: with the compiled one-pass kernels and with ATen's
    eager kernels (swiglu_kernels.ENABLED False). ``strided``: g and u are the two halves of one
    ``[.., 2n]`` tensor, as fuse_gate_up makes them (rows of stride 2n). n = 64: no element falls
    in ATen's scalar tail loop (see test_fused_kernels_at_vector_tails)."""
    torch.manual_seed(rows)
    n = 64
    gu = torch.randn(rows, 7, 2 * n, dtype=dtype)
    w = torch.randn(9, n, dtype=dtype)
    dy = torch.randn(rows, 7, 9, dtype=dtype)
    out = []
    for fused in (True, False):
        leaves = [gu.clone().requires_grad_(need[0] or need[1]), w.clone().requires_grad_(need[2])]
        g, u = leaves[0].split(n, dim=-1) if strided else (leaves[0][..., :n].contiguous(), leaves[0][..., n:].contiguous())
        swiglu_kernels.ENABLED = fused
        try:
            y = swiglu_linear(g, u, leaves[1])
            y.backward(dy)
        finally:
            swiglu_kernels.ENABLED = True
        out.append([y.detach()] + [t.grad for t in leaves if t.requires_grad])
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fused_kernels_bit_for_bit_equal_to_eager_kernels(dtype):
    """The one-pass kernels (torch.compile of the elementwise function, inductor's C++ on the CPU)
    against ATen's kernels one by one, through swiglu_linear: output and every gradient bit for bit,
    in fp32, float64 and bf16 (the roundings between the eager kernels kept, and silu_backward's
    contracted multiply-add), contiguous and row-strided; also without the weight gradient (no h
    recomputed). The kernels did run (a failed compilation warns, and warnings are errors here), and
    other token counts reuse them (dynamic shapes: a recompilation is an error here)."""
    import torch._dynamo as dynamo

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tp_ffn")  # our fallback warning (torch's own may come)
        for strided in (False, True):
            fused, eager = _fused_and_eager(dtype, 3, strided)
            for name, a, b in zip(("y", "d(g, u)", "dw"), fused, eager):
                assert torch.equal(a, b), (dtype, strided, name, rel_err(a, b))
            assert any(k[-2:] == (dtype, "cpu") for k in swiglu_kernels._compiled), "the fused kernels never ran"
            with dynamo.config.patch(error_on_recompile=True):
                for rows in (5, 11):
                    fused, eager = _fused_and_eager(dtype, rows, strided)
                    assert all(torch.equal(a, b) for a, b in zip(fused, eager)), (dtype, strided, rows)
        fused, eager = _fused_and_eager(dtype, 3, False, need=(True, True, False))
        assert all(torch.equal(a, b) for a, b in zip(fused, eager)), (dtype, "without dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fused_kernels_at_vector_tails(dtype):
    """Shapes whose elements do not fill ATen's vector loop (33, 70, 100 columns; 1-14 rows): ATen
    runs the rest as scalar code with the C library's exp, where the fused kernel's exp is Sleef's,
    so those elements are recomputed by ATen's kernels (swiglu_kernels._aten_tail): every output
    bit for bit ATen's, contiguous and row-strided."""
    from tp_ffn.swiglu import act_mul, act_mul_backward

    torch.manual_seed(4)
    for rows, n in ((14, 33), (3, 100), (1, 70), (5, 64)):
        for strided in (False, True):
            gu = torch.randn(rows, 2 * n, dtype=dtype) * 3
            g, u = gu.split(n, -1) if strided else (gu[:, :n].contiguous(), gu[:, n:].contiguous())
            dh = torch.randn(rows, n, dtype=dtype)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("error", message="tp_ffn")  # our fallback warning (torch's own may come)
                fused = (swiglu_kernels.silu_mul(g, u), *swiglu_kernels.silu_mul_backward(dh.clone(), g, u, need_h=True, reuse_dh=True))
                swiglu_kernels.ENABLED = False
                try:
                    eager = (act_mul(g, u, "silu"), *act_mul_backward(dh.clone(), g, u, "silu", need_h=True, reuse_dh=True))
                finally:
                    swiglu_kernels.ENABLED = True
            for name, a, b in zip(("h", "dg", "du", "h again"), fused, eager):
                assert torch.equal(a, b), (dtype, rows, n, strided, name, rel_err(a, b))


def test_failed_compilation_warns_once_and_runs_the_eager_kernels(monkeypatch):
    """Where the kernels cannot be compiled (here: a C++ compiler that does not exist), one warning
    line says so and ATen's eager kernels run, with the same values; nothing is silent. With
    ENABLED False the eager kernels run without a warning."""
    torch.manual_seed(0)
    g, u = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    want = F.linear(F.silu(g) * u, w)
    want_grads = torch.autograd.grad(want.sum(), (g, u, w))
    monkeypatch.setattr(swiglu_kernels, "_compiled", {})
    monkeypatch.setattr(swiglu_kernels, "_failed", set())
    monkeypatch.setattr(swiglu_kernels, "_OPTIONS", {**swiglu_kernels._OPTIONS, "cpp.cxx": ("/nonexistent/c++",)})
    with pytest.warns(RuntimeWarning, match="could not be compiled") as caught:
        y = swiglu_linear(g, u, w)
        grads = torch.autograd.grad(y.sum(), (g, u, w))
    assert len(caught) == 1 and "\n" not in str(caught[0].message), [str(c.message) for c in caught]
    assert torch.equal(y, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tp_ffn")  # our fallback warning (torch's own may come)
        swiglu_linear(g, u, w).sum().backward()  # warned once: not again
        monkeypatch.setattr(swiglu_kernels, "_failed", set())
        monkeypatch.setattr(swiglu_kernels, "ENABLED", False)
        swiglu_linear(g, u, w).sum().backward()


def test_uncompiled_bodies_run_atens_kernels(monkeypatch):
    """Where dynamo runs the kernels' functions without compiling them (a force_eager stance, its
    recompile limit) they run ATen's kernels: the same values bit for bit."""
    import torch._dynamo as dynamo

    torch.manual_seed(2)
    g, u = (torch.randn(3, 70, requires_grad=True) for _ in range(2))
    w = torch.randn(5, 70, requires_grad=True)
    want = F.linear(F.silu(g) * u, w)
    want_grads = torch.autograd.grad(want.sum(), (g, u, w))
    monkeypatch.setattr(swiglu_kernels, "_compiled", {})
    monkeypatch.setattr(swiglu_kernels, "_failed", set())
    with torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.filterwarnings("error", message="tp_ffn")  # no fallback: the bodies ran, uncompiled
        y = swiglu_linear(g, u, w)
        grads = torch.autograd.grad(y.sum(), (g, u, w))
    assert torch.equal(y, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert any(k[-2:] == (torch.float32, "cpu") for k in swiglu_kernels._compiled)
    # The same with dynamo disabled: fullgraph finds nothing compiled, one warning, ATen's kernels.
    monkeypatch.setattr(swiglu_kernels, "_compiled", {})
    # (config.patch, not monkeypatch: undoing a setattr deletes the config entry, and every later compile fails)
    with dynamo.config.patch(disable=True), pytest.warns(RuntimeWarning, match="could not be compiled"):
        y = swiglu_linear(g, u, w)
    assert torch.equal(y, want)
