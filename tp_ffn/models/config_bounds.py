"""A config read from a file may not describe a model larger than the weights stored beside it.

A ``config.json``, ``params.json`` or training ``meta.json`` is a few hundred bytes; the model it
describes is allocated before the weights are read. Comparing the two first turns a config that
lies (``"hidden_size": 10**12``, a million layers, a context of 10**12 positions) into a clear
error instead of an attempt to allocate terabytes.
"""

from __future__ import annotations

from .config import LlamaConfig

__all__ = ["ROPE_FLOOR_ELEMENTS", "check_config_fits"]

# The rotary tables hold max_seq_len x head_dim floats (cos and sin, head_dim / 2 each) whatever the
# weights hold; up to this many are allowed for any model (64 MiB in float32: Llama 3.1's 131072
# positions at head_dim 128), beyond it no more than the weights' own element count.
ROPE_FLOOR_ELEMENTS = 1 << 24


def check_config_fits(cfg: LlamaConfig, stored_elements: int, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` unless ``cfg`` fits in ``stored_elements`` stored weights.

    The model's parameters must not outnumber the stored elements, and its rotary tables
    (``max_seq_len x head_dim``) must not exceed the larger of the stored elements and
    :data:`ROPE_FLOOR_ELEMENTS`.
    """
    params = cfg.num_params()
    if params > stored_elements:
        raise ValueError(
            f"{source} describes {params:,} parameters (dim {cfg.dim}, {cfg.n_layers} layers, "
            f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}) but the stored weights hold {stored_elements:,} "
            f"elements; refusing to build it"
        )
    rope = cfg.max_seq_len * cfg.head_dim
    if rope > max(stored_elements, ROPE_FLOOR_ELEMENTS):
        raise ValueError(
            f"{source} asks for max_seq_len {cfg.max_seq_len} x head_dim {cfg.head_dim} = {rope:,} rotary-table elements, "
            f"more than the stored weights' {stored_elements:,} elements (or {ROPE_FLOOR_ELEMENTS:,}); refusing to build it"
        )
