"""Tokenizers for training and sampling: bytes, or the tokenizer a pretrained checkpoint came with.

One class per format, each saying which files are its own (``detect``), reading them (``load``) and
writing them the way a Hugging Face or Meta checkpoint carries them (``save``); :mod:`.resolve`
picks one for ``--tokenizer`` or reads a training checkpoint's copy. The libraries are imported
only when their format is used (``import tp_ffn`` and ``import tp_ffn.train`` load none of them)::

    kind           class                   files                                    library        a document
    bytes          ByteTokenizer           none (token = UTF-8 byte, vocab 256)     none           no BOS / EOS
    hf             HFTokenizer             tokenizer.json (+ tokenizer_config.json, tokenizers     BOS / EOS of the config
                                           special_tokens_map.json)
    tiktoken       TiktokenTokenizer       tokenizer.model: "base64 rank" lines     tiktoken       <|begin_of_text|> ...
                                           (Meta Llama 3) + Meta's 256 specials                    <|end_of_text|>
    sentencepiece  SentencePieceTokenizer  tokenizer.model: a SentencePiece model   sentencepiece  <s> ... </s>
                                           (Meta Llama 2)

Reading a tokenizer runs no code from its files: tokenizer.json and the configs are JSON, a
tiktoken file is parsed here as base64 and integers, a SentencePiece model is a protobuf message.

What ``save`` writes (the files encode every text to the ids the training run used, tested against
``transformers.AutoTokenizer``)::

    kind            to="hf"                                              to="meta"
    hf              its files, copied                                    its files, copied
    tiktoken        tokenizer.json (BPE from the ranks, Meta's pattern,  tokenizer.model, copied
                    specials) + tokenizer_config.json
    sentencepiece   tokenizer.model + tokenizer_config.json              tokenizer.model, copied
                    (LlamaTokenizer, legacy: plain text encodes as SentencePiece does)
    bytes           tokenizer.json (256 byte tokens) + config            nothing (Meta's code has no byte tokenizer)

Modules: :mod:`.base` (the interface, file names) <- one per format (:mod:`.byte_level`,
:mod:`.hf_json`, :mod:`.llama3_tiktoken`, :mod:`.llama2_sentencepiece`) <- :mod:`.resolve`.
"""

from .base import Tokenizer
from .byte_level import ByteTokenizer
from .hf_json import HFTokenizer
from .llama2_sentencepiece import SentencePieceTokenizer
from .llama3_tiktoken import TiktokenTokenizer
from .resolve import FORMATS, find_tokenizer, load_tokenizer, resolve_tokenizer, tokenizer_from_checkpoint

__all__ = [
    "FORMATS",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer",
    "tokenizer_from_checkpoint",
]
