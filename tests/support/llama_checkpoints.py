"""Tiny Llama checkpoints on disk (a random Hugging Face LlamaForCausalLM, a Meta directory) as module-scoped
fixtures: tests/models/test_weights.py and test_load_pretrained.py import them."""

from __future__ import annotations

import pytest
import torch

from tp_ffn.models import (
    LlamaConfig,
    Transformer,
    export_meta,
)

# GQA (2 kv heads for 4 query heads); 172 is not a multiple of 64, so the hidden-size rule has work to do.
HF_KW = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


# 24 heads / 12 kv heads split whole over TP 1, 2, 3 and MP 1, 2, 4; hidden 200 and vocab 250 make
# Meta's shard borders (MP 2, 4) and ours (TP 3: 67/67/66 rows of w1, 84/83/83 of output) fall in
# different places.
META_CFG = LlamaConfig(
    dim=96, n_layers=2, n_heads=24, n_kv_heads=12, vocab_size=250, multiple_of=8, ffn_dim_multiplier=0.78, max_seq_len=32
)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(HFConfig(**HF_KW)).float().eval()
    # HF's init (std 0.02, unit norms) barely uses attention; O(1) scores make rotary errors visible.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0.0, 0.15)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="60KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    tokens = _tokens(HF_KW["vocab_size"])
    with torch.no_grad():
        logits = model(tokens).logits
    return {"root": root, "single": root / "single", "sharded": root / "sharded", "tokens": tokens, "logits": logits}


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(META_CFG, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    root = tmp_path_factory.mktemp("meta")
    for n in (1, 2, 4):
        export_meta(model, root / f"mp{n}", n)
    tokens = _tokens(META_CFG.vocab_size)
    with torch.no_grad():
        logits = model(tokens)
    return {"root": root, "model": model, "tokens": tokens, "logits": logits}
