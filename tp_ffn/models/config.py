"""The shapes of a Llama model (:class:`LlamaConfig`, validated once) and the named presets.

Imports nothing of :mod:`tp_ffn.models`: the model, the checkpoint names and the readers all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..ffn import llama_ffn_hidden_dim

__all__ = ["PRESETS", "LlamaConfig"]


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama model; validated here, once. ``hidden_dim`` follows Meta's rule."""

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

    def num_params(self) -> int:
        d, h, v = self.dim, self.hidden_dim, self.vocab_size
        attn = d * d * 2 + 2 * d * self.kv_heads * self.head_dim
        return v * d * 2 + self.n_layers * (attn + 3 * d * h + 2 * d) + d

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
}
