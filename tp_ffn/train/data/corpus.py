"""The token stream: the Python standard library's sources (no download) or ``--data``, as bytes or tokens.

With the byte tokenizer the corpus is a flat ``uint8`` tensor of the text's bytes (vocabulary
256). With a real tokenizer it is the memory-mapped ``uint16`` / ``uint32`` token file of
:mod:`tp_ffn.train.data.token_cache`: every document tokenized once, framed by BOS / EOS. Either way
the tail (``val_fraction``) is held out for validation. Training sequences are windows of
``seq_len + 1`` tokens starting at multiples of ``seq_len``, visited in a fresh random order every epoch. Where the stream stands is
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
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError
from .documents import DataSource, find_data, iter_documents
from .token_cache import CacheOptions, default_cache_dir, load_tokens, report_failure
from .tokenizers.base import Tokenizer

__all__ = [
    "Corpus", "Windows", "load_corpus", "stdlib_source", "stdlib_sources", "validation_batch", "validation_count",
]  # fmt: skip

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
    """Train and validation tokens and where they came from."""

    train: Tensor  # uint8 (bytes), uint16 or uint32 (tokens) [n_train]
    val: Tensor  # same dtype [n_val]
    source: str
    fingerprint: str  # bytes: sha256 of the bytes; tokens: of the data files (16 hex digits)
    unit: str = "bytes"

    def describe(self) -> str:
        return f"{self.source}: {self.train.numel() + self.val.numel():,} {self.unit} ({self.val.numel():,} held out), sha256 {self.fingerprint}"


def _stdlib_files(corpus_bytes: int) -> list[Path]:
    files, size = [], 0
    for f in stdlib_sources():
        if size >= corpus_bytes:
            break
        files.append(f)
        size += f.stat().st_size
    return files


def stdlib_source(corpus_bytes: int) -> DataSource:
    """The first ``corpus_bytes`` of the standard library's sources, one document per file."""
    name = f"Python {sysconfig.get_python_version()} standard library sources"
    return find_data(name, files=_stdlib_files(corpus_bytes), limit=corpus_bytes)


def _byte_stream(data: str | DataSource | None, corpus_bytes: int) -> tuple[bytes, str]:
    if data is None:
        raw = b"".join(f.read_bytes() for f in _stdlib_files(corpus_bytes))[:corpus_bytes]
        return raw, f"Python {sysconfig.get_python_version()} standard library sources"
    source = data if isinstance(data, DataSource) else find_data(data)
    limit = memory_bytes() // 4  # the bytes are held in memory, twice while they are loaded
    if limit and source.total_bytes > limit:
        raise UsageError(
            f"--data: {source.spec} is {source.total_bytes / 2**30:.1f} GiB; the byte-level corpus is held in memory, "
            f"and this machine's {memory_bytes() / 2**30:.1f} GiB allow at most {limit / 2**30:.1f} GiB"
        )
    if len(source.files) == 1 and source.files[0].suffix != ".jsonl":
        return _read_text_file(source.files[0]), f"--data {source.spec}"
    # Several documents: their UTF-8 bytes, back to back (bytes have no EOS to put between them).
    return b"".join(text.encode("utf-8") for text, _ in iter_documents(source)), f"--data {source.spec}"


def memory_bytes() -> int:
    """Physical memory of this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_text_file(path: Path) -> bytes:
    """The bytes of a UTF-8 text file, checked in pieces (a decoded copy of the whole could be 4x its size)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--data: cannot read {path}: {e.strerror or e}") from None
    decoder, view, step = codecs.getincrementaldecoder("utf-8")(), memoryview(raw), 1 << 24
    for i in range(0, len(raw) + 1, step):
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(view[i : i + step], final=i + step > len(raw))
        except UnicodeDecodeError as e:
            raise UsageError(f"--data: {path} is not UTF-8 text (byte {i - pending + e.start}: {e.reason})") from None
    return raw


def load_corpus(
    data: str | DataSource | None,
    *,
    corpus_bytes: int,
    val_fraction: float,
    seq_len: int,
    tokenizer: Tokenizer | None = None,
    cache: CacheOptions | None = None,
) -> Corpus:
    """Read ``data`` (see :mod:`tp_ffn.train.data.documents`) or the standard library, turn it into
    tokens, and split off the validation tail.

    ``tokenizer`` ``None`` or of kind ``bytes``: the bytes, in memory. Otherwise the token file
    of :func:`~tp_ffn.train.data.token_cache.load_tokens` (``cache``: where, and whether this rank builds
    it; default: build it in :func:`~tp_ffn.train.data.token_cache.default_cache_dir`). Raises
    :class:`UsageError` for a missing or unreadable file, text that is not UTF-8, or data too short
    to hold one training and one validation sequence.
    """
    if tokenizer is None or tokenizer.kind == "bytes":
        raw, source = _byte_stream(data, corpus_bytes)
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        fingerprint, unit = hashlib.sha256(raw).hexdigest()[:16], "bytes"
    else:
        cache = cache or CacheOptions(default_cache_dir())
        try:
            src = (
                stdlib_source(corpus_bytes)
                if data is None
                else data
                if isinstance(data, DataSource)
                else find_data(data)
            )
        except UsageError as e:
            if cache.builder:  # the waiting ranks learn of it at once
                report_failure(cache, str(e))
            raise
        tokens = load_tokens(src, tokenizer, cache)
        source = src.spec if data is None else f"--data {src.spec}"
        fingerprint, unit = src.fingerprint, f"{tokenizer.kind} tokens"
    n = tokens.numel()
    n_val = int(n * val_fraction)
    if n - n_val < seq_len + 1 or n_val < seq_len + 1:
        raise UsageError(
            f"{source}: {n} {unit} are too few for --seq-len {seq_len} with --val-fraction {val_fraction} "
            f"(need at least {seq_len + 1} in each of the training and validation parts)"
        )
    return Corpus(tokens[: n - n_val], tokens[n - n_val :], source, fingerprint, unit)


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
        """First token of sequences ``position .. position + count - 1``."""
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
    # Slices widened one by one: uint16 / uint32 tensors (token files) have copy kernels in every
    # torch this package supports, but not every indexing kernel.
    return torch.stack([data[s : s + seq_len + 1].long() for s in starts.tolist()])
