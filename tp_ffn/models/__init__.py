"""Models built from the tensor-parallel layers."""

from .llama import PRESETS, LlamaConfig, Transformer

__all__ = ["PRESETS", "LlamaConfig", "Transformer"]
