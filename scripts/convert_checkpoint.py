"""Convert Llama checkpoints between Hugging Face and Meta layouts, and training checkpoints to either.

The same command as ``python -m tp_ffn.convert`` and ``tp-ffn-convert`` (kept at this path: docs
name it; every option: ``tp_ffn/convert.py``, ``--help``). E.g.:

    python scripts/convert_checkpoint.py --from hf --to meta --num-shards 2 SRC DST      # HF -> consolidated.00/01.pth
    python scripts/convert_checkpoint.py --from meta --to hf --max-seq-len 4096 SRC DST  # Meta (any shard count) -> HF
    python scripts/convert_checkpoint.py --from train --to hf runs/ft DST                # a training checkpoint -> HF

Errors: one line (``convert_checkpoint.py: error: ...``), exit status 2.
"""

from __future__ import annotations

import sys

from tp_ffn.convert import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="convert_checkpoint.py")


if __name__ == "__main__":
    sys.exit(main())
