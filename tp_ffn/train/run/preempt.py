"""Stopping on request: SIGTERM or SIGUSR1 end a run after the step it is in, with a checkpoint.

Slurm (preemption, ``scancel``, the time limit), Kubernetes and torchrun stop a job with SIGTERM
and kill it some seconds later (Slurm's ``KillWait``, 30 s by default; torchrun's own grace, 30 s);
Slurm's ``--signal`` and many clusters send SIGUSR1 earlier as a warning. :class:`StopSignals`
records such a signal and nothing else: the handler runs between two bytecodes of the main thread,
so a collective, a DCP write or an fsync in progress finishes first, and a second signal only
records again. The training loop asks every step whether any rank has a request
(:func:`tp_ffn.train.consensus.any_rank`), so every rank stops after the same step, saves it, and
the run exits with :data:`EXIT_PREEMPTED`.

The handlers are installed with ``SA_RESTART`` (``signal.siginterrupt(sig, False)``): a signal
does not make a system call of gloo's or NCCL's threads fail with EINTR.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopSignals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": a scheduler requeues on it.
EXIT_PREEMPTED = 75


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGUSR1 are recorded instead of ending the process.

    ``received`` is the name of the first one (``"SIGTERM"``), ``None`` before any; ``count`` how many
    came. On exit the previous handlers are restored, unless a signal came: the process is then on
    its way out (the checkpoint is saved, the exit line and status are still to come), and a second
    signal from the scheduler or torchrun must not kill it before that; later ones are recorded too.
    Outside the main thread no handler can be installed: a one-line warning says so and the signals
    keep their previous effect.
    """

    def __init__(self, warn: Any = None) -> None:
        self.received: str | None = None
        self.at: float | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._warn = warn if warn is not None else (lambda text: print(text, file=sys.stderr, flush=True))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            self._warn(
                "warning: train() runs outside the main thread: SIGTERM / SIGUSR1 cannot be caught here, "
                "so a stop signal ends the run without a checkpoint"
            )
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.received is None:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous.clear()
