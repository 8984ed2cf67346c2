"""What ``--data`` names: the files, the documents in them, and a fingerprint of their contents.

    --data FILE.txt         one document: the whole file (UTF-8)
    --data FILE.jsonl       one document per line: a JSON object whose "text" is a string
    --data DIR              every file below DIR (recursively, hidden ones skipped), sorted by path
    --data 'GLOB'           every file the pattern matches (``**`` recurses), sorted by path

Within a directory or glob, ``.jsonl`` files are read as JSON lines and every other file as one
text document. Empty documents are skipped. Errors name the file (and line) and what was wrong.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...files import regular_size
from ..errors import UsageError

__all__ = ["DataSource", "find_data", "iter_documents", "regular_file"]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class DataSource:
    """The files of ``--data`` in reading order; ``limit`` cuts the stream after that many bytes
    (only the built-in standard-library corpus sets it)."""

    spec: str
    files: tuple[Path, ...]
    fingerprint: str  # sha256 over every file's size, sha256 and reading (JSON lines or text), in order (16 hex digits)
    total_bytes: int
    limit: int | None = None

    def describe(self) -> str:
        n = len(self.files)
        what = self.spec if n == 1 else f"{self.spec} ({n} files)"
        return f"{what}: {self.total_bytes:,} bytes, sha256 {self.fingerprint}"


def regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (links followed); else :class:`UsageError` saying what it is
    (see :func:`tp_ffn.files.regular_size`)."""
    why = "; expected regular files of UTF-8 text or JSON lines"
    if regular_size(path, lambda what: UsageError(f"--data: {path} {what}{why}")) is None:
        raise UsageError(f"--data: no such file: {path}")
    return path


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # links to directories are not followed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [regular_file(Path(dirpath) / f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_jsonl(path: Path, limit: int | None) -> bool:
    """Whether ``path`` is read as JSON lines (documents) rather than as one text."""
    return path.suffix == ".jsonl" and limit is None


def _fingerprint(files: list[Path], limit: int | None) -> tuple[str, int]:
    h, total = hashlib.sha256(), 0
    for f in files:
        fh, size = hashlib.sha256(), 0
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                fh.update(chunk)
                size += len(chunk)
        # The same bytes read as JSON lines are other documents; text files keep their earlier line.
        h.update(f"{size} {fh.hexdigest()}{' jsonl' if _is_jsonl(f, limit) else ''}\n".encode())
        total += size
    if limit is not None:
        h.update(f"limit {limit}\n".encode())
        total = min(total, limit)
    return h.hexdigest()[:16], total


def find_data(spec: str, *, files: list[Path] | None = None, limit: int | None = None) -> DataSource:
    """The files ``spec`` names (a file, a directory or a glob), fingerprinted.

    ``files`` gives the list directly (``spec`` then only names it). Raises :class:`UsageError`
    when nothing is there or a file cannot be read.
    """
    if files is None:
        path = Path(spec)
        if any(c in _GLOB_CHARS for c in spec) and not path.exists():
            files = sorted((Path(p) for p in glob.glob(spec, recursive=True)), key=lambda p: p.as_posix())
            files = [f for f in files if f.is_file()]
            if not files:
                raise UsageError(f"--data: the pattern {spec!r} matches no file")
        elif path.is_dir():
            files = _walk(path)
            if not files:
                raise UsageError(f"--data: the directory {spec} holds no file")
        else:
            files = [regular_file(path)]
    try:
        fingerprint, total = _fingerprint(files, limit)
    except OSError as e:
        raise UsageError(f"--data: cannot read {e.filename or spec}: {e.strerror or e}") from None
    return DataSource(spec, tuple(files), fingerprint, total, limit)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data: {where} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _jsonl(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(_decode(line, where))
            except (ValueError, RecursionError) as e:
                raise UsageError(f"--data: {where}: not a JSON object ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UsageError(f'--data: {where}: expected an object with a string "text" field')
            yield text, len(line)


def iter_documents(source: DataSource) -> Iterator[tuple[str, int]]:
    """``(text, bytes read)`` for every document in order; an empty text marks a skipped line
    (its bytes still count, for progress)."""
    left = source.limit
    for path in source.files:
        try:
            if _is_jsonl(path, left):
                yield from _jsonl(path)
                continue
            raw = path.read_bytes()
        except OSError as e:
            raise UsageError(f"--data: cannot read {path}: {e.strerror or e}") from None
        if left is not None:
            raw, left = raw[:left], left - min(left, len(raw))
            # The cut may split a character: the limit counts bytes.
            yield raw.decode("utf-8", errors="ignore"), len(raw)
            if left == 0:
                return
            continue
        yield _decode(raw, str(path)), len(raw)
