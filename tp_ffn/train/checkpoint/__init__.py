"""Training checkpoints: :mod:`.store` (atomic, reshardable DCP saves and verified loads) on
:mod:`.safe_dcp` (DCP's reader without pickled code), :mod:`.digests` and :mod:`.layout` (each
rank's block of every parameter). Below the data: a checkpoint's tokenizer copy is read by
:mod:`tp_ffn.train.data.tokenizers`, not the other way."""
