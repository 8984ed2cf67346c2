"""Weights users already have: Hugging Face and Meta Llama checkpoints, at any tensor-parallel size.

Two layouts on disk::

    Hugging Face (LlamaForCausalLM)            Meta (llama reference code)
    config.json                                params.json
    model.safetensors                          consolidated.00.pth
      or model-0000X-of-0000N.safetensors        ... consolidated.{M-1:02d}.pth   (M model-parallel shards)
         + model.safetensors.index.json

Loading reads only this rank's rows or columns of every sharded weight, as its layer's
:class:`~tp_ffn.sharding.ShardSpec` says (the one safetensors reader, :mod:`tp_ffn.safetensors_dir`,
a chunk at a time; a memory-mapped ``torch.load`` for Meta shards), so a checkpoint written for any
number of shards loads into a :class:`~tp_ffn.models.Transformer` of any TP size. Every key and shape
is checked, and every slice is read, before the first parameter is written: a bad checkpoint leaves
the model as it was.

What each weight looks like in the three places (``hd`` = head_dim, ``M`` Meta shards, ``W`` TP ranks)::

    ours (Meta names)        Hugging Face name                     Meta split   ours (TP)
    tok_embeddings           model.embed_tokens                    dim 0 (*)    replicated
    layers.N.attention.wq    model.layers.N.self_attn.q_proj (**)  dim 0        dim 0 (whole heads)
    layers.N.attention.wk    model.layers.N.self_attn.k_proj (**)  dim 0        dim 0 (whole heads)
    layers.N.attention.wv    model.layers.N.self_attn.v_proj       dim 0        dim 0
    layers.N.attention.wo    model.layers.N.self_attn.o_proj       dim 1        dim 1
    layers.N.feed_forward.w1 model.layers.N.mlp.gate_proj          dim 0        dim 0
    layers.N.feed_forward.w2 model.layers.N.mlp.down_proj          dim 1        dim 1
    layers.N.feed_forward.w3 model.layers.N.mlp.up_proj            dim 0        dim 0
    layers.N.attention_norm  model.layers.N.input_layernorm        replicated   replicated
    layers.N.ffn_norm        model.layers.N.post_attention_layernorm  replicated  replicated
    norm                     model.norm                            replicated   replicated
    output                   lm_head                               dim 0        dim 0

    (*)  Llama 3 / llama-models (VocabParallelEmbedding); Llama 1/2's ParallelEmbedding splits dim 1.
         The loader tells them apart by the shard shapes; the exporter writes dim 0 unless told
         ``embedding_split="dim"``.
    (**) Hugging Face rotates the two halves of each head (``x[:hd/2]``, ``x[hd/2:]``) where Meta
         rotates adjacent pairs, so its q/k rows are permuted within every head:
         ``hf = meta.view(heads, hd/2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)``.
         The permutation never crosses heads, so a rank's whole heads can be read and unpermuted alone.

Typical use, at any TP size::

    cfg = config_from_pretrained(path)
    model = Transformer(cfg, group=tp_group, dtype=torch.bfloat16, device="meta")
    load_weights(model, path, device="cuda")

or in one call ``tp_ffn.models.llama.load_pretrained(path, group=tp_group, device="cuda", dtype=...)``
(``Transformer.from_pretrained``). ``load_pretrained(model, path)`` here is ``load_weights``'s older name.
"""

from __future__ import annotations

from .export import convert_checkpoint, export_hf, export_meta
from .loading import load_hf_checkpoint, load_meta_checkpoint, load_pretrained, load_weights
from .pretrained_config import config_from_hf, config_from_meta, config_from_pretrained, detect_format, ffn_rule_for

__all__ = [
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
