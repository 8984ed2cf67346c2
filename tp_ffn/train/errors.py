"""The error the training job, the sampler and the converter report to their user as one line.

Raised wherever bad input is found (an argument, a file, a checkpoint, ranks that see different
files); :func:`tp_ffn.train.cli.run_cli` prints it once, without a traceback, and exits with its
``exit_status``. Its own module, so that raising it imports nothing else.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A bad argument, file or checkpoint: reported as one line, without a traceback.

    ``agreed``: every rank raised this same error (see :func:`tp_ffn.train.consensus.agree`), so one
    rank reports it. ``rank``: the rank that saw it alone, once the process group existed.
    ``exit_status``: what the command exits with after reporting it (2, as argparse's own errors).
    """

    exit_status = 2

    def __init__(self, message: str, *, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed
        self.rank: int | None = None
