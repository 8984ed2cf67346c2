"""What the three commands share: argument errors, exit statuses, and which rank prints an error.

    command                                       module (its ``main``)     wrapper kept for the docs
    python -m tp_ffn.train    tp-ffn-train        tp_ffn.train.__main__     scripts/train.py
    python -m tp_ffn.sample   tp-ffn-sample       tp_ffn.sample             scripts/sample.py
    python -m tp_ffn.convert  tp-ffn-convert      tp_ffn.convert            scripts/convert_checkpoint.py

Each also runs under ``torchrun -m tp_ffn.<name> ...`` (train and sample use every rank). Bad input
of any kind is a :class:`~tp_ffn.train.errors.UsageError`, argparse's own included
(:class:`ArgumentParser`), and :func:`run_cli` turns what a command raised into one line on stderr
(``<prog>: error: ...``) from the rank that should print it (see
:func:`~tp_ffn.train.consensus.report_error`) and an exit status:

    0    done
    1    the loss diverged (``FloatingPointError``; the same on every rank, rank 0 prints it)
    2    bad input (``UsageError.exit_status``): an argument, a file, a checkpoint, ranks that disagree,
         --ckpt-dir in use by another run
    3    a checkpoint or the metrics could not be written (``SaveError.exit_status``: full disk, I/O
         error; nothing older is lost)
    75   stopped by SIGTERM or SIGUSR1 after saving the step it was in (the training job's own status,
         :data:`tp_ffn.train.run.preempt.EXIT_PREEMPTED`: run it again with --resume)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable

from .consensus import report_error
from .errors import UsageError

__all__ = ["ArgumentParser", "process_rank", "run_cli"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing its usage and exiting on every rank."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def process_rank() -> int:
    """This process's global rank: the process group's while it exists, else torchrun's ``RANK`` (0 alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def run_cli(prog: str | None, command: Callable[[str], int | None]) -> int:
    """Run ``command(prog)`` and return the process's exit status (see the table above): its own,
    else 0. ``prog`` (default: the name the process was started as, e.g. ``tp-ffn-train``) names
    the command in its ``--help`` and starts its error lines."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        status = command(prog)
    except UsageError as e:
        report_error(prog, e)
        return e.exit_status
    except FloatingPointError as e:  # the loss diverged: the same on every rank (it is all-reduced)
        if process_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if status is None else status
