"""Models built from the tensor-parallel layers, and the checkpoints they load and save.

Imports point one way (each module imports only those above it in this list)::

    weights_types.py      type aliases of the readers and writers
    config.py             LlamaConfig and the presets (nothing of tp_ffn.models)
    config_bounds.py      a config may not describe more than the weights beside it hold
    kv_cache.py           KVCache: this rank's keys and values of earlier positions, for generation
    weight_names.py       the one HF <-> Meta names table (files, tensors), HF's q/k row order
    hf_files.py           an HF Llama checkpoint on the one safetensors reader (tp_ffn.safetensors_dir)
    moe_config.py         the expert fields of a Mixtral config.json, read and written
    meta_files.py         consolidated.XX.pth, memory-mapped and weights_only
    pretrained_config.py  the LlamaConfig of a checkpoint directory; which layout it is
    loading.py            this rank's blocks (its layers' ShardSpecs) of a checkpoint into a Transformer: load_weights
    export.py             a Transformer or a checkpoint directory written as HF or Meta
    llama.py              Transformer (the decoder on a TP group), load_pretrained(path, ...) (build + load, one call)
    weights.py            the public names of the loaders and writers (the table of every tensor in both layouts)

Two loaders: ``load_weights(model, path)`` fills a model already built; ``llama.load_pretrained(path, group=,
device=, dtype=)`` (= ``Transformer.from_pretrained``) builds it from the directory's config and fills it.
``tp_ffn.models.load_pretrained(model, path)`` is ``load_weights``'s older name, kept.
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
    load_weights,
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
    "load_weights",
]
