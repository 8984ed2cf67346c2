"""Generate text from a training checkpoint or a pretrained one, the model sharded over all ranks (TP).

The same command as ``python -m tp_ffn.sample`` and ``tp-ffn-sample`` (kept at this path: docs and
launch scripts name it; every option: ``tp_ffn/sample.py``, ``--help``). E.g.:

    python scripts/sample.py --ckpt-dir runs/tiny --prompt "def " --max-new-tokens 200
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/sample.py --ckpt-dir runs/ft \\
        --prompt "Once upon a time" --num-samples 3 --temperature 0.7 --top-p 0.9 --seed 1

Errors: one line (``sample.py: error: ...``), exit status 2.
"""

from __future__ import annotations

import sys

from tp_ffn.sample import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="sample.py")


if __name__ == "__main__":
    sys.exit(main())
