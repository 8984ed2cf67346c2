"""Content digests of checkpoint files: SHA-256, streamed from disk in fixed-size blocks.

SHA-256 is in every Python's ``hashlib`` (OpenSSL underneath, with the SHA extensions of x86 and
ARM CPUs where present), so a checkpoint written on one machine can be checked on any other
without an extra package. ``benchmarks/bench_digest.py`` measures what it costs next to a save.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ALGORITHM", "BLOCK_BYTES", "bytes_digest", "file_digest", "file_digests", "is_digest"]

ALGORITHM = "sha256"
BLOCK_BYTES = 1 << 20  # hashlib releases the GIL on blocks this large; the file is never held whole


def file_digest(path: str | os.PathLike) -> str:
    """Hex digest of the file at ``path``, read in blocks of :data:`BLOCK_BYTES`."""
    h = hashlib.new(ALGORITHM)
    buf = bytearray(BLOCK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: file_digest(root / name)}``."""
    return {name: file_digest(root / name) for name in names}


def bytes_digest(data: bytes | bytearray | memoryview) -> str:
    """Hex digest of bytes already in memory (the same value :func:`file_digest` gives for a file of them)."""
    return hashlib.new(ALGORITHM, data).hexdigest()


def is_digest(value: object) -> bool:
    """Whether ``value`` has the form of a hex digest of :data:`ALGORITHM`."""
    size = hashlib.new(ALGORITHM).digest_size * 2
    return isinstance(value, str) and len(value) == size and all(c in "0123456789abcdef" for c in value)
