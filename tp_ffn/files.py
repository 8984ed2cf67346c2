"""Paths read from disk that could be anything: only regular files are opened.

A FIFO in place of a config or data file blocks the first read forever, a device (``/dev/zero``)
never ends, a link loop cannot be opened; :func:`regular_size` tells these apart before anything
is opened, and each caller words the error for its own argument.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

__all__ = ["regular_size"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def regular_size(path: str | os.PathLike, error: Callable[[str], Exception]) -> int | None:
    """Size of the regular file at ``path`` (links followed); ``None`` when nothing is there.

    Anything else raises ``error(why)``, ``why`` completing a sentence about the path:
    ``"is not a regular file (a FIFO)"``, ``"cannot be read (Too many levels of symbolic links)"``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _KINDS if test(st.st_mode)), "not a file")
        raise error(f"is not a regular file ({kind})")
    return st.st_size
