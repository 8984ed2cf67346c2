"""Training checkpoints: :mod:`.store` (atomic, reshardable DCP saves and verified loads) on
:mod:`.saving` (writing them: free space, failed writes, --ckpt-async), :mod:`.safe_dcp` (DCP's reader
without pickled code), :mod:`.digests` and :mod:`.layout` (each rank's block of every parameter);
:mod:`.run_lock` keeps one run per --ckpt-dir. Below the data: a checkpoint's tokenizer copy is read by
:mod:`tp_ffn.train.data.tokenizers`, not the other way.

``load_full_tensors`` and ``verify_checkpoint`` (docs/training.md) are importable from here.
"""

from .store import load_full_tensors, verify_checkpoint

__all__ = ["load_full_tensors", "verify_checkpoint"]
