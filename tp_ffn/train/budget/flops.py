"""Model FLOPs utilisation (MFU): the FLOPs of a training step, the peak they are held against.

The model FLOPs of one token of a training step (forward + backward) of the Llama decoder of
:mod:`tp_ffn.models.llama`, the count of PaLM's appendix B (and nanoGPT's ``estimate_mfu``)::

    flops_per_token = 6 * N + 12 * n_layers * dim * seq_len

    N = n_layers * (dim * dim                      wq
                    + 2 * dim * n_kv_heads * head_dim   wk, wv
                    + dim * dim                    wo
                    + 3 * dim * hidden_dim)        w1, w2, w3
        + dim * vocab_size                         the output head

With experts (``n_experts > 0``) the feed-forward term counts the weights one token multiplies, its
*active* parameters (``LlamaConfig.ffn_params(active=True)``), not all of them::

    dim * n_experts                                the router
    + n_experts_per_token * 3 * dim * expert_hidden_dim    the top-k routed experts
    + 3 * dim * shared_expert_hidden_dim           the shared expert
    + dim                                          its gate (if any)

(the routing itself, softmax and top-k, and the weighting of the outputs are element-wise and left out).

``N`` counts the weights that multiply every token: each is 2 FLOPs (multiply, add) per token in
the forward and 4 in the backward (input and weight gradients). The token embedding is a lookup
and the norms are element-wise, so neither is in ``N``. The second term is attention's two
matrix products (scores ``q k^T`` and ``scores v``: ``2 * 2 * seq_len * dim`` per token and layer
forward, twice that backward), counted over the whole ``seq_len x seq_len`` square as PaLM does,
although a causal kernel may skip the masked half; grouped-query attention repeats k and v to
``n_heads``, so the term does not depend on ``n_kv_heads``. Element-wise work (norms, rotary,
SwiGLU, softmax, loss) is left out, and so is the recomputation of activation checkpointing: MFU
counts the model's FLOPs, not the hardware's.

MFU of a step of ``tokens`` tokens (the global batch: ``batch_size * seq_len``) taking ``seconds``
on ``devices`` ranks::

    mfu = flops_per_token * tokens / seconds / (peak_per_device * devices)

i.e. the model FLOPs per second achieved by all ranks together over what all devices could do.
Tensor and data parallelism change neither the model FLOPs nor the number of devices doing them.
The peak per device is either given (``--peak-tflops``: e.g. a GPU's data-sheet dense bf16 rate)
or measured at start-up by :func:`tp_ffn.machine.gemm_rate` on every rank at once, in the run's
compute dtype: on a CPU whose cores the ranks share, a rank's peak is its share of the machine
while all ranks compute (its own thread count, ``torch.get_num_threads()``), so the peaks of the
ranks add up to the machine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.llama import LlamaConfig

__all__ = ["Peak", "matmul_params", "measure_peak", "mfu", "model_flops_per_token"]


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that multiply every token: every block's projections and the output head."""
    d, kv = cfg.dim, cfg.kv_heads * cfg.head_dim
    return cfg.n_layers * (2 * d * d + 2 * d * kv + cfg.ffn_params(active=True)) + d * cfg.vocab_size


def model_flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """FLOPs of one token of a forward + backward pass at sequence length ``seq_len`` (see the module doc)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.dim * seq_len


def mfu(flops: float, seconds: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: ``flops`` done by all ``devices`` in ``seconds``, over their peak."""
    return flops / seconds / (peak_per_device * devices)


@dataclass(frozen=True)
class Peak:
    """The rate MFU is held against, per device, in FLOP/s, and where it came from."""

    flops: float
    source: str

    def describe(self) -> str:
        return f"{self.flops / 1e12:.4g} TFLOP/s per device ({self.source})"


def measure_peak(
    dtype: torch.dtype, device: torch.device, *, given_tflops: float | None = None
) -> tuple[Peak, str | None]:
    """The peak for MFU, and a warning line when bf16 is slow on this CPU (else ``None``).

    ``given_tflops`` (``--peak-tflops``) is taken as it is; otherwise every rank of the default
    group probes ``dtype`` GEMMs at once. On a CPU, bf16 is also held against fp32: far below it,
    the warning says so (the run goes on).
    """
    from ...machine import bf16_is_slow, gemm_rate, slow_bf16_message

    warning = None
    needs_check = device.type == "cpu" and dtype == torch.bfloat16
    rate = gemm_rate(dtype, device) if given_tflops is None or needs_check else 0.0
    if needs_check:
        fp32 = gemm_rate(torch.float32, device)
        if bf16_is_slow(rate, fp32):
            warning = slow_bf16_message(rate, fp32)
    if given_tflops is not None:
        return Peak(given_tflops * 1e12, "--peak-tflops"), warning
    name = str(dtype).removeprefix("torch.")
    per = f", {torch.get_num_threads()} thread(s) per rank" if device.type == "cpu" else ""
    return Peak(rate, f"{name} GEMM probe at start-up, all ranks at once{per}"), warning
