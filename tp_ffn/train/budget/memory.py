"""The memory plan: what one rank of a training run will need, estimated before anything is built.

Per rank, in bytes (``P`` = this rank's parameters: its TP block of every weight, then FSDP2's
piece of that over dp, padded as FSDP2 pads it to ``ceil(rows / dp)`` rows)::

    parameters    4 P          fp32 master weights
    gradients     4 P          fp32, sharded like the parameters
    AdamW         8 P          exp_avg and exp_avg_sq
    unsharded     FSDP2's all-gathered TP blocks in the compute dtype: the root (embedding, output
                  head, final norm; kept through backward), two transformer blocks (the one running
                  and the one prefetched) and one block's unsharded gradients (plus their fp32 copy
                  for the reduce-scatter in bf16)
    activations   what autograd keeps for backward over all layers (below), plus one layer's worth
                  in flight in backward (with activation checkpointing: the recomputed layer too)
    logits        12 bytes per token and vocabulary entry: the loss's fp32 log-softmax output, the
                  gradient coming into it and the one it returns (every TP rank holds the full
                  logits: the output head gathers them)
    runtime       what a rank grows by beyond its tensors (CPU: code pages, gloo, allocator; 32
                  MiB, measured on tiny runs; CUDA: cuBLAS / NCCL workspaces, 1 GiB, not measured);
                  on CPU glibc keeps freed blocks for reuse, so the resident set can exceed the
                  plan; ``--return-freed-memory`` makes it return them
                  (:func:`~tp_ffn.train.budget.memory_use.release_freed_memory`), at a cost in speed

The peak is ``parameters + AdamW + runtime + max(backward start, backward end, optimizer step)``:
at the start of backward the activations and logits are all alive but no gradient yet (they are
set to ``None`` after every step), at its end every gradient but no activation, and the optimizer
step adds its temporaries (CUDA's foreach AdamW: one fp32 copy of ``P``) to the gradients.

**Activations kept per layer** (``T`` tokens of a micro-batch, ``T_l = T / tp`` with sequence
parallelism else ``T``; ``a`` = 2 bytes in bf16, 4 in fp32; ``h_r = n_heads / tp`` local heads of
``head_dim`` channels), counted from what :mod:`tp_ffn.models.llama` saves and checked against
``saved_tensors_hooks`` by ``tests/train/test_memory_plan.py``:

* each of the two RMSNorms, on ``T_l`` tokens: its fp32 input (4 dim; in fp32 the input itself),
  ``rsqrt`` (4) and the normalised input before the weight (``a`` dim);
* attention, on ``T`` tokens: the input of wq/wk/wv (``a`` dim; gathered under SP), the rotated q,
  the repeated k and v and the output of the attention kernel (``4 a h_r head_dim``) and its
  log-sum-exp (``4 h_r``); in bf16 also FSDP2's bf16 copies of the rotary tables;
* the feed-forward block: whatever :class:`~tp_ffn.ParallelFeedForward` keeps, measured at start-up
  (:func:`~tp_ffn.train.budget.memory_use.measure_ffn_saved`) because that block chooses it (its execution modes differ, and a
  block that recomputes its activation keeps less): tiny blocks on the real TP group, with the
  run's dtype, modes and sequence parallelism, fitted to ``T (c_d dim + c_n n_r + c_t) + c_w dim n_r + c``.

* a mixture-of-experts block (``n_experts > 0``; :class:`~tp_ffn.ParallelMoEFeedForward`), counted
  from what it documents it keeps (docs/moe.md, "Compute and memory"), per token of ``T``: ``x``
  (``a`` dim), per routed slot its ``g, u`` (``2 a n_r``), weight (``a``) and two int64 row indices,
  the shared expert's ``g, u`` (``2 a n_s``) and gate (``a``), the router's fp32 softmax and top-k
  indices (``4 E + 8 k``), and the router logits kept for the auxiliary loss with its softmax
  (``2 a E + 4 E``). Parameters count every expert (FSDP2 cuts the stacked ``[E, ...]`` experts
  along E).

With activation checkpointing a layer keeps only its input (``a`` dim on ``T_l`` tokens, plus the
rotary copies in bf16). Outside the layers: the final norm, the output head's input (``a`` dim on
``T`` tokens) and the token ids.

The budget is the device's: CUDA ``torch.cuda.mem_get_info`` free bytes of this rank's GPU; CPU
``MemAvailable`` of ``/proc/meminfo`` divided among this node's ranks (``LOCAL_WORLD_SIZE``); the
smallest of all ranks' budgets decides (:func:`smallest_budget`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ...models.llama import LlamaConfig
from ..config import ParallelPlan, TrainConfig
from ..errors import UsageError
from .memory_use import FFNSaved, measure_ffn_saved

__all__ = [
    "Budget",
    "FFNSaved",
    "Layout",
    "MemoryEstimate",
    "Workload",
    "available_memory",
    "check_memory",
    "estimate",
    "memory_report",
    "plan_memory",
    "saved_activation_bytes",
    "smallest_budget",
    "suggest",
]

GiB = 2**30
# Growth beyond the tensors: CPU measured on the tiny preset (benchmarks/memory_check.py, 0.02-0.04 GiB
# with freed blocks returned to the system); CUDA (cuBLAS / NCCL workspaces, allocator slack) not measured yet.
RUNTIME_BYTES = {"cpu": 32 * 2**20, "cuda": 1 * GiB}


@dataclass(frozen=True)
class Layout:
    """The choices the refusal suggests changing."""

    tp: int
    dp: int
    micro_batch: int
    activation_checkpointing: bool


@dataclass(frozen=True)
class Workload:
    """What the plan needs besides the layout: tokens per sequence, compute dtype (``float32`` or
    ``bfloat16``), sequence parallelism, what the feed-forward block keeps, the device type, and
    whether the run trains (``--eval-only``: no gradients, optimizer state or saved activations)."""

    seq_len: int
    dtype: str
    sequence_parallel: bool
    ffn: FFNSaved
    device_type: str = "cpu"
    training: bool = True

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    def rope_bytes(self, cfg: LlamaConfig) -> int:
        """FSDP2's per-block bf16 copies of the rotary tables (in fp32 the blocks read the buffers)."""
        return self.seq_len * cfg.head_dim * 2 if self.dtype == "bfloat16" else 0


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's estimated bytes, by part (see the module doc); ``total`` is the peak."""

    parameters: int
    gradients: int
    optimizer: int
    unsharded: int
    activations: int
    logits: int
    runtime: int
    total: int

    def parts(self) -> str:
        names = ("parameters", "gradients", "optimizer", "unsharded", "activations", "logits", "runtime")
        labels = {"optimizer": "AdamW"}
        return ", ".join(f"{labels.get(n, n)} {_gib(getattr(self, n))}" for n in names)

    def describe(self) -> str:
        return f"{_gib(self.total)} GiB per rank ({self.parts()} GiB)"


@dataclass(frozen=True)
class Budget:
    """Bytes one rank may use, and where the number came from."""

    bytes: int
    source: str


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


# ---------------------------------------------------------------------------------------------
# The estimate.


def _rows(n: int, parts: int) -> int:
    """The largest of ``torch.tensor_split(n, parts)``'s pieces (what the busiest rank holds)."""
    return -(-n // parts)


def _fsdp(rows: int, cols: int, dp: int) -> int:
    """Elements of one rank's FSDP2 piece of a ``[rows, cols]`` block (padded to equal pieces)."""
    return _rows(rows, dp) * cols


def _shapes(cfg: LlamaConfig, tp: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``[rows, cols]`` of this rank's TP block of every weight: (one transformer block's, the root's)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv, h = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, _rows(cfg.hidden_dim, tp)
    ffn = [(h, d), (d, h), (h, d)]
    moe = cfg.moe
    if moe is not None:  # stacked experts [E, n_r, d] / [E, d, n_r]: FSDP2 shards their first dim
        n, s = _rows(moe.hidden_dim, tp), _rows(moe.shared_hidden_dim, tp)
        ffn = [(moe.num_experts, d)] + [(moe.num_experts, n * d)] * 3
        ffn += [(s, d), (d, s), (s, d)] if s else []
        ffn += [(1, d)] if moe.shared_expert_gate else []
    block = [(q, d), (kv, d), (kv, d), (d, q), *ffn, (d, 1), (d, 1)] + [(q, 1), (kv, 1), (kv, 1)] * cfg.qkv_bias
    root = [(cfg.vocab_size, d), (_rows(cfg.vocab_size, tp), d), (d, 1)]
    return block, root


def layer_saved_bytes(cfg: LlamaConfig, tokens: int, tp: int, work: Workload) -> int:
    """What autograd keeps for one transformer block's backward (no checkpointing); see the module doc."""
    a, d, h_r = work.act_bytes, cfg.dim, cfg.n_heads // tp
    local = tokens // tp if work.sequence_parallel and tp > 1 else tokens
    norms = 2 * local * (4 * d + 4 + a * d)
    attention = tokens * (a * d + 4 * a * h_r * cfg.head_dim + 4 * h_r)
    return norms + attention + work.rope_bytes(cfg) + _ffn_saved_bytes(cfg, tokens, tp, work)


def _ffn_saved_bytes(cfg: LlamaConfig, tokens: int, tp: int, work: Workload) -> int:
    """What the feed-forward block keeps: measured for the dense block, counted for an MoE block."""
    moe = cfg.moe
    if moe is None:
        return math.ceil(work.ffn.bytes(tokens, cfg.dim, _rows(cfg.hidden_dim, tp)))
    a, k, e = work.act_bytes, moe.top_k, moe.num_experts
    n_r, n_s = _rows(moe.hidden_dim, tp), _rows(moe.shared_hidden_dim, tp)
    shared = (2 * a * n_s + a * moe.shared_expert_gate) if n_s else 0
    return tokens * (a * cfg.dim + k * (2 * a * n_r + a + 16) + shared + 4 * e + 8 * k + 2 * a * e + 4 * e)


def saved_activation_bytes(cfg: LlamaConfig, layout: Layout, work: Workload) -> int:
    """What autograd keeps between the forward (loss included) and the backward of one micro-batch."""
    a, d, tp = work.act_bytes, cfg.dim, layout.tp
    tokens = layout.micro_batch * work.seq_len
    local = tokens // tp if work.sequence_parallel and tp > 1 else tokens
    if layout.activation_checkpointing:
        per_layer = local * a * d + work.rope_bytes(cfg)
    else:
        per_layer = layer_saved_bytes(cfg, tokens, tp, work)
    ids = layout.micro_batch * (work.seq_len + 1) * 8
    # final norm, output head input, token ids, the loss's log-softmax output, targets and total weight
    root = local * (4 * d + 4 + a * d) + tokens * a * d + ids + tokens * cfg.vocab_size * 4 + tokens * 8 + 4
    return cfg.n_layers * per_layer + root


def estimate(cfg: LlamaConfig, layout: Layout, work: Workload) -> MemoryEstimate:
    """One rank's peak bytes for training ``cfg`` at ``layout`` (see the module doc)."""
    tp, dp, a = layout.tp, layout.dp, work.act_bytes
    block, root = _shapes(cfg, tp)
    p_local = cfg.n_layers * sum(_fsdp(r, c, dp) for r, c in block) + sum(_fsdp(r, c, dp) for r, c in root)
    block_full = sum(_rows(r, dp) * dp * c for r, c in block)
    root_full = sum(_rows(r, dp) * dp * c for r, c in root)
    grad_copy = a + (4 if work.dtype == "bfloat16" else 0)  # unsharded gradient, and its fp32 copy in bf16
    unsharded_fwd = a * (root_full + 2 * block_full) + grad_copy * block_full
    unsharded_end = a * (root_full + block_full) + grad_copy * root_full

    tokens = layout.micro_batch * work.seq_len
    one_layer = layer_saved_bytes(cfg, tokens, tp, work)
    saved = saved_activation_bytes(cfg, layout, work)
    log_softmax = tokens * cfg.vocab_size * 4  # counted in `saved`; reported under logits
    in_flight = one_layer * (2 if layout.activation_checkpointing else 1)
    activations = saved - log_softmax + in_flight
    logits = 3 * log_softmax

    params, grads, adam = 4 * p_local, 4 * p_local, 8 * p_local
    runtime = RUNTIME_BYTES.get(work.device_type, RUNTIME_BYTES["cpu"])
    if not work.training:  # a forward without autograd: one block's tensors at a time, the loss's fp32 logits
        unsharded = a * (root_full + 2 * block_full)
        logits = tokens * cfg.vocab_size * (a + 4 + 4)
        peak = params + runtime + unsharded + one_layer + logits
        return MemoryEstimate(params, 0, 0, unsharded, one_layer, logits, runtime, peak)
    optimizer_tmp = 4 * p_local if work.device_type == "cuda" else 2 * 4 * max(_fsdp(r, c, dp) for r, c in block + root)
    peak = (
        params
        + adam
        + runtime
        + max(activations + logits + unsharded_fwd, grads + unsharded_end, grads + optimizer_tmp)
    )
    unsharded = max(unsharded_fwd, unsharded_end)
    return MemoryEstimate(params, grads, adam, unsharded, activations, logits, runtime, peak)


# ---------------------------------------------------------------------------------------------
# The budget and the decision.


def available_memory(device: torch.device, local_world: int | None = None) -> Budget | None:
    """Bytes this rank may use: the GPU's free memory, or the node's ``MemAvailable`` shared among
    its ``LOCAL_WORLD_SIZE`` ranks; ``None`` where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget(free, f"free on {device}")
    local = local_world if local_world is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    ranks = f" / {local} local ranks" if local > 1 else ""
    return Budget(kib * 1024 // local, f"MemAvailable {_gib(kib * 1024)} GiB{ranks}")


def _valid_tp(cfg: LlamaConfig, tp: int, work: Workload) -> bool:
    return cfg.n_heads % tp == 0 and cfg.kv_heads % tp == 0 and not (work.sequence_parallel and work.seq_len % tp)


def _flags(layout: Layout, now: Layout) -> list[str]:
    out = []
    if layout.tp != now.tp or layout.dp != now.dp:
        out += [f"--tp {layout.tp}", f"--dp {layout.dp}"]
    if layout.micro_batch != now.micro_batch:
        out.append(f"--micro-batch-size {layout.micro_batch}")
    if layout.activation_checkpointing and not now.activation_checkpointing:
        out.append("--activation-checkpointing")
    return out


def suggest(cfg: LlamaConfig, now: Layout, budget: int, *, batch_size: int, work: Workload) -> str:
    """What would fit in ``budget`` bytes per rank: first within this world size (fewest flags
    changed, then the largest micro-batch), else the smallest world whose ranks, each with
    ``budget`` bytes of their own, would hold it."""
    world = now.tp * now.dp
    options = []
    for tp in (t for t in range(1, world + 1) if world % t == 0 and _valid_tp(cfg, t, work)):
        dp = world // tp
        if batch_size % dp:
            continue
        for micro in (m for m in range(1, batch_size // dp + 1) if batch_size % (m * dp) == 0):
            for ac in {now.activation_checkpointing, True}:
                layout = Layout(tp, dp, micro, ac)
                if layout != now:
                    options.append(layout)
    fitting = [(o, estimate(cfg, o, work).total) for o in options]
    fitting = [(o, t) for o, t in fitting if t <= budget]
    if fitting:
        fitting.sort(key=lambda ot: (len(_flags(ot[0], now)), -ot[0].micro_batch, ot[0].tp))
        shown = [f"{' '.join(_flags(o, now))} ({_gib(t)} GiB)" for o, t in fitting[:2]]
        return "would fit: " + " or ".join(shown)
    for w in range(world + 1, 4097):
        for tp in (t for t in range(w, 0, -1) if w % t == 0 and _valid_tp(cfg, t, work) and batch_size % (w // t) == 0):
            layout = Layout(tp, w // tp, 1, True)
            total = estimate(cfg, layout, work).total
            if total <= budget:
                return (
                    f"nothing fits on {world} rank(s); {w} ranks with {_gib(budget)} GiB each would: "
                    f"{' '.join(_flags(layout, replace(now, tp=0)))} ({_gib(total)} GiB per rank)"
                )
    return "nothing fits in any world of up to 4096 ranks"


def check_memory(
    cfg: LlamaConfig, layout: Layout, budget: Budget | None, *, batch_size: int, work: Workload, force: bool
) -> tuple[MemoryEstimate, str]:
    """The estimate and the header's memory line; :class:`UsageError` (one line) when it does not fit
    in ``budget`` and ``force`` is off."""
    est = estimate(cfg, layout, work)
    if budget is None:
        return est, f"memory plan: {est.describe()}; available memory unknown here"
    line = f"memory plan: {est.describe()} of {_gib(budget.bytes)} GiB available ({budget.source})"
    if est.total <= budget.bytes:
        return est, line
    hint = suggest(cfg, layout, budget.bytes, batch_size=batch_size, work=work)
    if force:
        return est, line + f": does not fit, going on (--force); {hint}"
    raise UsageError(
        f"memory: this run needs about {est.describe()} but {_gib(budget.bytes)} GiB are available per rank "
        f"({budget.source}); {hint}; --force to try anyway"
    )


def plan_memory(
    cfg: TrainConfig, plan: ParallelPlan, mcfg: LlamaConfig, tp_group: Any, device: torch.device
) -> tuple[MemoryEstimate, str]:
    """The training job's memory plan (:func:`check_memory` for its arguments). Every rank calls it
    at once: the feed-forward block is measured on ``tp_group``, and the budget is the smallest any
    rank of the world has, so that every rank reaches the same decision in the same words."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    modes = {
        "fuse_gate_up": cfg.ffn_fuse_gate_up,
        "overlap_comm": cfg.ffn_overlap_comm,
        "comm_chunks": cfg.ffn_comm_chunks,
    }
    ffn = measure_ffn_saved(tp_group, dtype=dtype, device=device, sequence_parallel=cfg.sequence_parallel, modes=modes)
    layout = Layout(plan.tp, plan.dp, plan.micro_batch, cfg.activation_checkpointing)
    work = Workload(cfg.seq_len, cfg.dtype, cfg.sequence_parallel and plan.tp > 1, ffn, device.type, not cfg.eval_only)
    return check_memory(mcfg, layout, smallest_budget(device), batch_size=plan.batch_size, work=work, force=cfg.force)


def smallest_budget(device: torch.device) -> Budget | None:
    """:func:`available_memory` of the rank that has the least (every rank calls this at once);
    ``None`` if any rank cannot tell."""
    mine = available_memory(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if any(b is None for b in every):
        return None
    least = min(every, key=lambda b: b.bytes)
    return Budget(least.bytes, f"{least.source}; the least of {len(every)} ranks")


def memory_report(measured: float, est: MemoryEstimate, device: torch.device, *, freed_returned: bool = True) -> str:
    """The run's last memory line: the measured peak (the busiest rank's growth since the plan)
    against the estimate (on CUDA without the runtime part, which the allocator does not see).
    ``freed_returned``: on CPU, whether glibc was told to return freed blocks (else it says so)."""
    if device.type == "cuda":
        expected, how = est.total - est.runtime, "max_memory_allocated over what was allocated at the plan"
    else:
        expected, how = est.total, "VmHWM over the resident set at the plan"
    line = (
        f"peak {_gib(measured)} GiB on the busiest rank ({how}), estimated {_gib(expected)} GiB "
        f"({(expected - measured) / max(measured, 1):+.0%})"
    )
    if device.type != "cuda" and not freed_returned:
        line += "; glibc keeps freed blocks (--return-freed-memory: the resident set follows the tensors)"
    return line
