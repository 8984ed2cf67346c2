"""The shapes of a Llama model (:class:`LlamaConfig`, validated once) and the named presets.

Imports nothing of :mod:`tp_ffn.models`: the model, the checkpoint names and the readers all build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..ffn import llama_ffn_hidden_dim
from ..moe import ROUTINGS, MoEConfig

__all__ = ["PRESETS", "LlamaConfig"]

# The fields that describe experts: a dense model (n_experts = 0) keeps their defaults.
_EXPERT_FIELDS = (
    "n_experts_per_token", "expert_hidden_dim", "shared_expert_hidden_dim", "shared_expert_gate", "routing",
    "norm_topk_prob",
)  # fmt: skip


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama model; validated here, once. ``hidden_dim`` follows Meta's rule.

    ``qkv_bias``: wq, wk and wv carry biases (Qwen2-MoE's attention; wo has none).

    ``n_experts > 0`` makes every feed-forward block a mixture of experts (:attr:`moe`, a
    :class:`~tp_ffn.MoEConfig`): ``n_experts`` SwiGLU experts of ``expert_hidden_dim`` (0: ``hidden_dim``),
    ``n_experts_per_token`` of them per token, chosen by ``routing`` (``norm_topk_prob``: renormalise the
    chosen weights; ``None``: the routing's default), plus an optional shared expert of
    ``shared_expert_hidden_dim`` with an optional sigmoid gate (Qwen2-MoE). Training adds
    ``router_aux_loss_coef`` x the load-balancing loss. ``n_experts = 0`` (the default) is the dense model,
    and the expert fields must then keep their defaults.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    qkv_bias: bool = False
    n_experts: int = 0
    n_experts_per_token: int = 2
    expert_hidden_dim: int = 0
    shared_expert_hidden_dim: int = 0
    shared_expert_gate: bool = False
    routing: str = "softmax"
    norm_topk_prob: bool | None = None
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for f in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig.{f}: expected a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig: head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"LlamaConfig.qkv_bias: expected a bool, got {self.qkv_bias!r}")
        self._check_experts()

    def _check_experts(self) -> None:
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ValueError(f"LlamaConfig.n_experts: expected an int >= 0, got {self.n_experts!r}")
        coef = self.router_aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
            raise ValueError(f"LlamaConfig.router_aux_loss_coef: expected a finite number >= 0, got {coef!r}")
        if not self.n_experts:
            changed = [
                f.name for f in fields(self) if f.name in _EXPERT_FIELDS and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ValueError(f"LlamaConfig: {', '.join(changed)} set, but n_experts is 0 (a dense model)")
            return
        if self.routing not in ROUTINGS:
            raise ValueError(f"LlamaConfig.routing: expected one of {list(ROUTINGS)}, got {self.routing!r}")
        if self.routing == "sigmoid":
            # DeepSeek-V3's selection bias is a buffer no gradient trains (and no training checkpoint keeps).
            raise ValueError("LlamaConfig.routing: 'sigmoid' (DeepSeek-V3) is not trained by this model; use "
                             "'softmax' or 'topk_sigmoid'")  # fmt: skip
        try:
            self.moe  # noqa: B018 - MoEConfig validates the rest
        except (TypeError, ValueError) as e:
            raise ValueError(f"LlamaConfig (experts): {e}") from None

    @property
    def moe(self) -> MoEConfig | None:
        """The feed-forward blocks' :class:`~tp_ffn.MoEConfig`, or ``None`` for a dense model."""
        if not self.n_experts:
            return None
        return MoEConfig(
            num_experts=self.n_experts,
            top_k=self.n_experts_per_token,
            hidden_dim=self.expert_hidden_dim or self.hidden_dim,
            shared_hidden_dim=self.shared_expert_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
            routing=self.routing,
            norm_topk_prob=self.norm_topk_prob,
        )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return llama_ffn_hidden_dim(self.dim, multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier)

    def tp_sizes(self) -> list[int]:
        """The tensor-parallel sizes (and Meta shard counts) that give every rank whole heads: the
        common divisors of ``n_heads`` and ``n_kv_heads``."""
        return [n for n in range(1, self.kv_heads + 1) if self.n_heads % n == 0 and self.kv_heads % n == 0]

    def check_tp(self, tp: int) -> None:
        """Raise ``ValueError`` unless the heads split evenly over ``tp`` ranks."""
        if self.n_heads % tp or self.kv_heads % tp:
            raise ValueError(
                f"tp: n_heads ({self.n_heads}) and n_kv_heads ({self.kv_heads}) must both be divisible by the "
                f"tensor-parallel size, got tp={tp} (sizes that split them: {', '.join(map(str, self.tp_sizes()))})"
            )

    def ffn_params(self, *, active: bool = False) -> int:
        """Weights of one feed-forward block; ``active``: only those one token multiplies (top-k routed
        experts, the shared expert, the router and its gate), as the FLOP count takes them."""
        d, moe = self.dim, self.moe
        if moe is None:
            return 3 * d * self.hidden_dim
        experts = moe.top_k if active else moe.num_experts
        return d * moe.num_experts + experts * 3 * d * moe.hidden_dim + 3 * d * moe.shared_hidden_dim + d * int(
            moe.shared_expert_gate
        )

    def num_params(self) -> int:
        """Every parameter (all experts of every MoE block)."""
        d, v = self.dim, self.vocab_size
        kv = self.kv_heads * self.head_dim
        attn = d * d * 2 + 2 * d * kv + (d + 2 * kv) * self.qkv_bias
        return v * d * 2 + self.n_layers * (attn + self.ffn_params() + 2 * d) + d

    def updated(self, **changes: object) -> LlamaConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"LlamaConfig: unknown fields {unknown}; known: {sorted(known)}")
        return replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    # Byte-level, trains in minutes on 2 CPU cores.
    "tiny": LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256),
    "small": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=64, max_seq_len=512),
    # GPT-2 small's shape (dim 768, 12 layers, 12 heads) in Llama's blocks with Llama 2's vocabulary
    # size: 134 M parameters, a quick training run on one GPU (benchmarks/gpu_check.sh).
    "gpt2-small": LlamaConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256, max_seq_len=2048),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "llama3-8b": LlamaConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),  # fmt: skip
    # The tiny shape with 4 experts (top 2) of 43 rows (22 + 21 over TP 2) and a gated shared expert of 37
    # (19 + 18): trains on CPU in seconds (docs/moe.md, "The training job").
    "tiny-moe": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256,
        n_experts=4, n_experts_per_token=2, expert_hidden_dim=43, shared_expert_hidden_dim=37, shared_expert_gate=True,
    ),  # fmt: skip
}
