"""Paths read from disk that could be anything: only regular files are opened.

A FIFO in place of a config or data file blocks the first read forever, a device (``/dev/zero``)
never ends, a link loop cannot be opened; :func:`regular_size` tells these apart before anything
is opened, and each caller words the error for its own argument. :func:`read_json_object` reads a
small JSON config or index that way.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["JSON_MAX_BYTES", "read_json_object", "regular_size"]

JSON_MAX_BYTES = 64 << 20  # configs and indexes are KB; a bigger file is not read into memory

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


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small regular file; ``ValueError`` naming the file for anything else.

    A FIFO or device in its place is refused before it is opened (reading it could block forever
    or never end), and so is a file larger than :data:`JSON_MAX_BYTES`.
    """
    size = regular_size(path, lambda why: ValueError(f"{path}: the {what} {why}"))
    if size is None:
        raise ValueError(f"{path}: no {what} here")
    if size > JSON_MAX_BYTES:
        raise ValueError(f"{path}: {size} bytes is far more than a {what}; refusing to read it")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read the {what}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
