"""Make a tiny "pretrained" Llama checkpoint locally, with no download: a Hugging Face directory that
``scripts/train.py --init-from`` and ``transformers`` both read.

    python scripts/make_tiny_pretrained.py runs/walkthrough/pretrained
    python scripts/make_tiny_pretrained.py OUT --text corpus.txt --vocab-size 1024 --dim 128 --layers 4

The tokenizer is a byte-level BPE that the ``tokenizers`` library trains on ``--text`` (default: the
first ``--text-bytes`` of the Python standard library's sources), with Llama 2's special tokens
``<unk>``, ``<s>`` (BOS, added in front of every encoded text) and ``</s>`` (EOS). The model is a
``transformers.LlamaForCausalLM`` with random weights drawn from ``--seed``. OUT gets
``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json``. Needs ``tp-ffn[test]`` (transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, metavar="OUT", help="directory to write (must not exist or be empty)")
    p.add_argument("--text", type=Path, nargs="*", default=None, help="UTF-8 files to train the tokenizer on")
    p.add_argument("--text-bytes", type=int, default=2_000_000, help="bytes of the standard library (no --text)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (HF's initializer_range)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text:
        return [f.read_text(encoding="utf-8") for f in args.text]
    from tp_ffn.train.data.corpus import stdlib_sources

    out, size = [], 0
    for f in stdlib_sources():
        if size >= args.text_bytes:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        size += len(text)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"make_tiny_pretrained: error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tp_ffn import llama_ffn_hidden_dim

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_texts(args), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=args.max_seq_len, clean_up_tokenization_spaces=False,
    )  # fmt: skip

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=llama_ffn_hidden_dim(args.dim, multiple_of=32), max_position_embeddings=args.max_seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=bos,
        eos_token_id=tok.token_to_id("</s>"), torch_dtype="float32", initializer_range=args.init_std,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(args.out, safe_serialization=True)
    hf_tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: LlamaForCausalLM ({n / 1e6:.2f} M params), BPE tokenizer of {config.vocab_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
