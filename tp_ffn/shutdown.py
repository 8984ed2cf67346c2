"""Ending a script that ran gloo collectives (or the profiler) without the interpreter's teardown
killing it after its work is done.

A gloo process group runs its collectives on worker threads, and a worker drops its reference to a
finished collective (``AsyncWork``) only after it has signalled completion. When the script's
last collective finishes just before the process exits, that reference can still be held when the
interpreter finalizes: the worker's release then decrements a Python tensor, which needs the GIL,
and a finalizing interpreter ends any thread that asks for it, which a C++ thread cannot survive
(``std::terminate``: "terminate called without an active exception", SIGABRT). A core dump of
``benchmarks/parity.py`` at 3 ranks on 2 cores (torch 2.13.0, CPU) showed exactly that:
``ProcessGroupGloo::runLoop`` in ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
``PyThread_exit_thread`` while the main thread was in ``Py_FinalizeEx``; the same abort hit
parity.py and bench.py on CI (PyTorch pull request 179291 describes it; it was abandoned). The
profiler's kineto thread can race libtorch's static destructors in the same way.

``destroy_process_group()`` does not prevent it when modules still hold the group. The training
scripts collect their objects and meet at a barrier before destroying the group
(:meth:`tp_ffn.train.run.parallelize.Runtime.shutdown`); the short measurement scripts, whose last
collective is close to their exit, end with :func:`exit_without_teardown`.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["exit_without_teardown"]


def exit_without_teardown(code: int | None) -> NoReturn:
    """Flush stdout and stderr, then end the process with ``code`` (None: 0) through ``os._exit``:
    no interpreter finalization, no C++ static destructors, so no thread left in torch can abort it.

    Everything the script wrote must be closed before (``Path.write_text``, ``savefig`` and ``with
    open`` are); atexit handlers do not run.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed or a broken pipe: nothing to flush
            pass
    os._exit(code or 0)
