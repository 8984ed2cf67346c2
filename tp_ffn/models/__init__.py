"""Models built from the tensor-parallel layers, and the checkpoints they load and save.

llama.py              LlamaConfig, Transformer (the decoder on a TP group), presets, load_pretrained (one call)
kv_cache.py           KVCache: this rank's keys and values of earlier positions, for generation
weight_names.py       file and tensor names of the Hugging Face and Meta layouts, HF's q/k row order
pretrained_config.py  the LlamaConfig of a checkpoint directory; which layout it is
config_bounds.py      a config may not describe more than the weights beside it hold
hf_files.py           safetensors, read one slice at a time
meta_files.py         consolidated.XX.pth, memory-mapped and weights_only
loading.py            this rank's slices of a checkpoint into a Transformer
export.py             a Transformer or a checkpoint directory written as HF or Meta
weights.py            the public names of the above (the table of every tensor in both layouts)
"""

from .kv_cache import KVCache
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
    "KVCache",
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
