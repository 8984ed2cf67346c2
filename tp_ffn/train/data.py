"""Byte-level data with no download: the Python standard library's sources, or the user's text.

The corpus is a flat ``uint8`` tensor (token = byte, vocabulary 256); its tail (``val_fraction``)
is held out for validation. Training sequences are windows of ``seq_len + 1`` bytes starting at
multiples of ``seq_len``, visited in a fresh random order every epoch. Where the stream stands is
one integer, the *position* (sequences consumed since the start, over all ranks), so a checkpoint
stores it and a resumed run, at any data-parallel size, continues with the very next batch::

    global batch of step s: sequences [p, p + batch)           p = s * batch
    micro-step a, dp rank d: sequences p + (a * dp + d) * micro ... + micro

Sequence ``q`` is window ``perm_e[q mod n]`` of epoch ``e = q // n``, where ``perm_e`` is
``torch.randperm(n)`` from a generator seeded by ``(seed, e)``: the same on every rank and machine.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import UsageError

__all__ = ["Corpus", "Windows", "load_corpus", "stdlib_sources", "validation_batch", "validation_count"]

# Directories of the standard library that are not its own sources (or are mostly test data).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "idlelib"}


def stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path (a deterministic order)."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        rel = Path(dirpath).relative_to(base)
        found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return [base / f for f in sorted(found)]


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes and where they came from."""

    train: Tensor  # uint8 [n_train]
    val: Tensor  # uint8 [n_val]
    source: str
    fingerprint: str  # sha256 of all bytes, first 16 hex digits

    def describe(self) -> str:
        return f"{self.source}: {self.train.numel() + self.val.numel():,} bytes ({self.val.numel():,} held out), sha256 {self.fingerprint}"


def load_corpus(data: str | None, *, corpus_bytes: int, val_fraction: float, seq_len: int) -> Corpus:
    """Read ``data`` (a UTF-8 text file) or the standard library, and split off the validation tail.

    Raises :class:`UsageError` for a missing or unreadable file, text that is not UTF-8, or data
    too short to hold one training and one validation sequence.
    """
    if data is not None:
        raw = _read_text_file(data)
        source = f"--data {data}"
    else:
        chunks, size = [], 0
        for f in stdlib_sources():
            if size >= corpus_bytes:
                break
            b = f.read_bytes()
            chunks.append(b)
            size += len(b)
        raw = b"".join(chunks)[:corpus_bytes]
        source = f"Python {sysconfig.get_python_version()} standard library sources"
    n = len(raw)
    n_val = int(n * val_fraction)
    if n - n_val < seq_len + 1 or n_val < seq_len + 1:
        raise UsageError(
            f"{source}: {n} bytes are too few for --seq-len {seq_len} with --val-fraction {val_fraction} "
            f"(need at least {seq_len + 1} bytes in each of the training and validation parts)"
        )
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return Corpus(t[: n - n_val], t[n - n_val :], source, hashlib.sha256(raw).hexdigest()[:16])


def memory_bytes() -> int:
    """Physical memory of this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_text_file(data: str) -> bytes:
    """The bytes of the ``--data`` file, refused unless it is a regular file of UTF-8 text that fits in memory.

    A FIFO or a device (``/dev/zero``) would block forever or never end; the corpus is held in memory
    (twice while it is loaded), so a file above a quarter of the machine's memory is refused up front.
    """
    try:
        st = os.stat(data)
    except FileNotFoundError:
        raise UsageError(f"--data: no such file: {data}") from None
    except OSError as e:  # a link loop, a permission, ...
        raise UsageError(f"--data: cannot read {data}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise UsageError(f"--data: expected a regular file of UTF-8 text, {data} is {what}")
    limit = memory_bytes() // 4
    if limit and st.st_size > limit:
        raise UsageError(
            f"--data: {data} is {st.st_size / 2**30:.1f} GiB; the corpus is held in memory, and this machine's "
            f"{memory_bytes() / 2**30:.1f} GiB allow at most {limit / 2**30:.1f} GiB"
        )
    try:
        raw = Path(data).read_bytes()
    except OSError as e:
        raise UsageError(f"--data: cannot read {data}: {e.strerror or e}") from None
    decoder, view, step = codecs.getincrementaldecoder("utf-8")(), memoryview(raw), 1 << 24
    for i in range(0, len(raw) + 1, step):  # in pieces: a decoded copy of the whole file could be 4x its size
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(view[i : i + step], final=i + step > len(raw))
        except UnicodeDecodeError as e:
            raise UsageError(f"--data: {data} is not UTF-8 text (byte {i - pending + e.start}: {e.reason})") from None
    return raw


class Windows:
    """The training stream: ``batch(position, count) -> int64 [count, seq_len + 1]``."""

    def __init__(self, data: Tensor, seq_len: int, seed: int) -> None:
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.count = (data.numel() - 1) // seq_len
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.count, generator=g))
        return self._perm[1]

    def starts(self, position: int, count: int) -> Tensor:
        """First byte of sequences ``position .. position + count - 1``."""
        out = torch.empty(count, dtype=torch.int64)
        for i in range(count):
            epoch, k = divmod(position + i, self.count)
            out[i] = self._order(epoch)[k] * self.seq_len
        return out

    def batch(self, position: int, count: int) -> Tensor:
        return _gather(self.data, self.starts(position, count), self.seq_len)


def validation_batch(data: Tensor, seq_len: int, first: int, count: int) -> Tensor:
    """Validation sequences ``first .. first + count - 1``: consecutive windows from the start."""
    starts = torch.arange(first, first + count, dtype=torch.int64) * seq_len
    return _gather(data, starts, seq_len)


def validation_count(data: Tensor, seq_len: int, wanted: int) -> int:
    return min(wanted, (data.numel() - 1) // seq_len)


def _gather(data: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    idx = starts[:, None] + torch.arange(seq_len + 1, dtype=torch.int64)
    return data[idx].long()
