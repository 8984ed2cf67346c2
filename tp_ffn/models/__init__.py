"""Models built from the tensor-parallel layers, and the checkpoints they load and save."""

from .llama import PRESETS, LlamaConfig, Transformer
from .weights import (
    config_from_hf,
    config_from_meta,
    config_from_pretrained,
    convert_checkpoint,
    detect_format,
    export_hf,
    export_meta,
    ffn_rule_for,
    load_hf_checkpoint,
    load_meta_checkpoint,
    load_pretrained,
)

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "Transformer",
    "config_from_hf",
    "config_from_meta",
    "config_from_pretrained",
    "convert_checkpoint",
    "detect_format",
    "export_hf",
    "export_meta",
    "ffn_rule_for",
    "load_hf_checkpoint",
    "load_meta_checkpoint",
    "load_pretrained",
]
