"""Tiny Hugging Face models of the families tp_ffn.hf supports, built locally (nothing is downloaded).

``intermediate_size`` 37 splits unevenly at every world size from 2 to 4 (19+18, 13+12+12, 10+9+9+9).
"""

from __future__ import annotations

from typing import Any

import torch

INTERMEDIATE = 37
VOCAB = 64


def tiny(family: str, **overrides: Any) -> tuple[type, Any]:
    """``(model_class, config)`` of a two-layer model of ``family`` (llama, mistral, qwen2, gemma)."""
    import transformers as tf

    common = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": INTERMEDIATE, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    classes = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": 8}),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig, {"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}),
    }
    model_class, config_class, extra = classes[family]
    return model_class, config_class(**{**common, **extra, **overrides})


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any) -> torch.nn.Module:
    """The dense model, in eval mode, with the same weights for the same seed on every rank."""
    model_class, config = tiny(family, **overrides)
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def tokens(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
