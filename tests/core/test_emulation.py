"""emulate_pretraining_tp against Hugging Face's LlamaMLP and against the dense block.

Hugging Face's ``LlamaMLP`` (transformers 4.46.3) with ``config.pretraining_tp = k > 1`` splits
gate/up by rows and down by columns into slices of ``intermediate_size // k`` and sums k partial
products. Where that is well defined (no bias, k divides the hidden size, 3-D input) ours must agree
with it; everywhere ours must agree with the dense forward. HF's slicing has defects that are pinned
here as tests, each next to ours getting the same configuration right:

* ``mlp_bias=True``: the k > 1 branch calls ``F.linear`` without the biases, so all three are dropped.
* k not dividing the hidden size: only the first ``k * (hidden // k)`` hidden units are used; the
  remainder is silently dropped.
* k > hidden: ``slice == 0`` and ``Tensor.split(0)`` raises ``RuntimeError``.
* input not 3-D: the intermediate states are split along the hard-coded ``dim=2``, so 1-D and 2-D
  inputs raise ``IndexError`` and 4-D inputs a ``RuntimeError`` (shape mismatch).

Tolerances: fp32 with dim 24, hidden <= 101 and a few tokens; ours and the dense block differ only in
the order of the k partial sums (a few ulps, ~1e-7 relative), so 1e-5 leaves two orders of margin.
Ours and HF perform the same operations in the same order where both are defined (measured
bit-identical), so 1e-6 there. The defects are >= 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch
from support.reference import dense64, rel_err
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from tp_ffn import FeedForward, emulate_pretraining_tp
from tp_ffn.ffn import ACTIVATIONS

DIM = 24
TOL = 1e-5
HF_TOL = 1e-6
SHAPES = ((DIM,), (5, DIM), (2, 3, DIM), (2, 2, 3, DIM))  # 1-D to 4-D inputs


def _ffn(hidden: int, *, bias: bool = False, activation: str = "silu", seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    return FeedForward(DIM, hidden, bias=bias, activation=activation)


def _hf_mlp(ffn: FeedForward, k: int) -> LlamaMLP:
    """HF's LlamaMLP with ``pretraining_tp=k`` holding ``ffn``'s weights (gate=w1, up=w3, down=w2)."""
    bias = ffn.w1.bias is not None
    config = LlamaConfig(
        hidden_size=ffn.dim, intermediate_size=ffn.hidden_dim, pretraining_tp=k, hidden_act="silu", mlp_bias=bias
    )
    mlp = LlamaMLP(config)
    with torch.no_grad():
        for hf_name, ours in (("gate_proj", ffn.w1), ("up_proj", ffn.w3), ("down_proj", ffn.w2)):
            theirs = getattr(mlp, hf_name)
            theirs.weight.copy_(ours.weight)
            if bias:
                theirs.bias.copy_(ours.bias)
    return mlp


def _without_bias(ffn: FeedForward) -> FeedForward:
    sd = {k: v for k, v in ffn.state_dict().items() if k.endswith(".weight")}
    return FeedForward.from_state_dict(sd, activation=ffn.activation)


def _first_hidden_units(ffn: FeedForward, m: int) -> FeedForward:
    """The block restricted to its first ``m`` hidden units (w1/w3 rows and w2 columns ``[0, m)``)."""
    sd = ffn.state_dict()
    cut = {"w1.weight": sd["w1.weight"][:m], "w3.weight": sd["w3.weight"][:m], "w2.weight": sd["w2.weight"][:, :m]}
    return FeedForward.from_state_dict(cut, activation=ffn.activation)


# --- agreement with Hugging Face where its slicing is well defined ---------------------------------


@pytest.mark.parametrize(
    "k, bias", [(1, False), (1, True), (2, False), (3, False), (4, False), (6, False), (8, False), (96, False)]
)
def test_matches_hf_llama_mlp(k, bias):
    """k divides 96; at k = 1 HF takes its dense branch, which keeps biases, so bias is checked there."""
    ffn = _ffn(96, bias=bias, seed=k)
    mlp = _hf_mlp(ffn, k)
    x = torch.randn(2, 5, DIM)
    gy = torch.randn(2, 5, DIM)

    x_ours = x.clone().requires_grad_()
    y_ours = emulate_pretraining_tp(ffn, x_ours, k)
    y_ours.backward(gy)
    x_hf = x.clone().requires_grad_()
    y_hf = mlp(x_hf)
    y_hf.backward(gy)

    assert rel_err(y_ours, y_hf) <= HF_TOL
    assert rel_err(x_ours.grad, x_hf.grad) <= HF_TOL
    for hf_name, ours in (("gate_proj", ffn.w1), ("up_proj", ffn.w3), ("down_proj", ffn.w2)):
        theirs = getattr(mlp, hf_name)
        assert rel_err(ours.weight.grad, theirs.weight.grad) <= HF_TOL, hf_name
        if bias:
            assert rel_err(ours.bias.grad, theirs.bias.grad) <= HF_TOL, hf_name
    assert rel_err(y_ours, ffn(x)) <= TOL

    # Negative control: gate and up swapped (the naming mix-up this mapping guards against) is seen.
    swapped = _hf_mlp(FeedForward.from_state_dict({
        "w1.weight": ffn.w3.weight, "w3.weight": ffn.w1.weight, "w2.weight": ffn.w2.weight,
        **({"w1.bias": ffn.w3.bias, "w3.bias": ffn.w1.bias, "w2.bias": ffn.w2.bias} if bias else {}),
    }), k)  # fmt: skip
    assert rel_err(swapped(x), y_ours) > 1e-2


# --- agreement with the dense block everywhere ------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matches_dense(activation, bias):
    """hidden 101 is divisible by none of k = 2, 3, 4, 7, 50; k = 1 and k = hidden are the extremes."""
    ffn = _ffn(101, bias=bias, activation=activation, seed=len(activation) + bias)
    ref = dense64(ffn)
    others = {name: FeedForward.from_state_dict(ffn.state_dict(), activation=name) for name in ACTIVATIONS}
    failures = []
    for shape in SHAPES:
        x = torch.randn(shape)
        want = ffn(x)
        want64 = ref(x.double())
        for k in (1, 2, 3, 4, 7, 50, 101):
            got = emulate_pretraining_tp(ffn, x, k)
            if got.shape != want.shape:
                failures.append(f"shape {shape} k={k}: output shape {tuple(got.shape)}")
                continue
            for what, err in (("fp32 dense", rel_err(got, want)), ("float64 dense", rel_err(got, want64))):
                if err > TOL:
                    failures.append(f"shape {shape} k={k}: rel err vs {what} {err:.2e} > {TOL}")
        # Negative control: every other activation is told apart at this tolerance (the closest
        # pair, gelu and gelu_tanh, differs by ~1e-4 here).
        got = emulate_pretraining_tp(ffn, x, 3)
        for name, other in others.items():
            if name != activation and rel_err(got, other(x)) <= TOL:
                failures.append(f"shape {shape}: {activation} output indistinguishable from {name}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradients_match_dense(activation):
    ffn = _ffn(101, bias=True, activation=activation, seed=7)
    x = torch.randn(2, 3, DIM)
    gy = torch.randn(2, 3, DIM)
    xd = x.clone().requires_grad_()
    ffn(xd).backward(gy)
    want = {name: p.grad.clone() for name, p in ffn.named_parameters()}
    for k in (2, 3, 7):
        ffn.zero_grad()
        xe = x.clone().requires_grad_()
        emulate_pretraining_tp(ffn, xe, k).backward(gy)
        assert rel_err(xe.grad, xd.grad) <= TOL, f"k={k}: input grad"
        for name, p in ffn.named_parameters():
            # Nonzero reference: the comparison cannot pass with two missing / zero gradients.
            assert want[name].norm() > 0, name
            assert p.grad is not None and rel_err(p.grad, want[name]) <= TOL, f"k={k}: {name} grad"


def test_input_gradient_matches_finite_differences():
    """Independent of the dense block's autograd: float64 gradcheck of the sliced computation."""
    torch.manual_seed(3)
    ffn = FeedForward(4, 7, bias=True, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: emulate_pretraining_tp(ffn, t, 3), (x,))


# --- Hugging Face's defects, next to ours getting the same configuration right ---------------------


@pytest.mark.parametrize("k", [2, 4])
def test_hf_drops_biases_with_mlp_bias(k):
    ffn = _ffn(96, bias=True, seed=11)
    mlp = _hf_mlp(ffn, k)
    x = torch.randn(2, 5, DIM)
    want = ffn(x)
    hf = mlp(x)
    assert rel_err(hf, want) > 1e-1  # a large error, not rounding
    assert rel_err(hf, _without_bias(ffn)(x)) <= HF_TOL  # exactly: all three biases dropped
    assert rel_err(emulate_pretraining_tp(ffn, x, k), want) <= TOL
    # At k = 1 HF takes the dense branch and keeps them.
    assert rel_err(_hf_mlp(ffn, 1)(x), want) <= HF_TOL


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_hf_drops_remainder_when_k_does_not_divide_hidden(k):
    ffn = _ffn(101, seed=k)
    mlp = _hf_mlp(ffn, k)
    x = torch.randn(2, 5, DIM)
    want = ffn(x)
    hf = mlp(x)
    assert rel_err(hf, want) > 1e-2
    used = k * (101 // k)  # 100, 99, 100, 98
    assert rel_err(hf, _first_hidden_units(ffn, used)(x)) <= HF_TOL  # exactly: units [used, 101) dropped
    assert rel_err(emulate_pretraining_tp(ffn, x, k), want) <= TOL


def test_hf_raises_when_k_exceeds_hidden():
    ffn = _ffn(3)
    x = torch.randn(1, 2, DIM)
    with pytest.raises(RuntimeError, match="split_size can only be 0"):
        _hf_mlp(ffn, 4)(x)
    with pytest.raises(ValueError, match="pretraining_tp"):
        emulate_pretraining_tp(ffn, x, 4)
    assert rel_err(emulate_pretraining_tp(ffn, x, 3), ffn(x)) <= TOL


@pytest.mark.parametrize("shape, error", [((DIM,), IndexError), ((5, DIM), IndexError), ((2, 2, 3, DIM), RuntimeError)])
def test_hf_needs_3d_input_where_ours_takes_any(shape, error):
    ffn = _ffn(96)
    x = torch.randn(shape)
    with pytest.raises(error):
        _hf_mlp(ffn, 2)(x)
    assert rel_err(emulate_pretraining_tp(ffn, x, 2), ffn(x)) <= TOL
    assert rel_err(_hf_mlp(ffn, 1)(x), ffn(x)) <= HF_TOL  # HF's dense branch takes any shape


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 102])
def test_pretraining_tp_out_of_range(k):
    with pytest.raises(ValueError, match="pretraining_tp"):
        emulate_pretraining_tp(_ffn(101), torch.randn(2, DIM), k)


@pytest.mark.parametrize("k", [1.5, True, 2.0, "2", None])
def test_pretraining_tp_not_an_int(k):
    with pytest.raises(TypeError, match="pretraining_tp"):
        emulate_pretraining_tp(_ffn(101), torch.randn(2, DIM), k)


@pytest.mark.parametrize("shape", [(2, DIM + 1), (DIM - 1,), (3, 2, 1)])
def test_wrong_input_width(shape):
    with pytest.raises(ValueError, match=r"\bx\b") as info:
        emulate_pretraining_tp(_ffn(101), torch.randn(shape), 2)
    assert str(DIM) in str(info.value)


def test_not_a_feedforward():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="ffn"):
        emulate_pretraining_tp(torch.nn.Linear(DIM, DIM), torch.randn(2, DIM), 2)
