"""Tokenize ``--data`` once into a memory-mapped token file that every rank reads.

The file is named by what it holds, ``<data fingerprint>-<tokenizer fingerprint>.tokens`` in the
cache directory (``--token-cache``; default ``$TP_FFN_CACHE/tokens`` or ``~/.cache/tp_ffn/tokens``)::

    bytes 0 .. 7       b"TPFFNTOK"
    bytes 8 .. 4095    JSON header, space padded: version, dtype (uint16 up to 65,536 ids, else
                       uint32), byteorder, count, documents, data and tokenizer fingerprints,
                       sha256 of the token bytes
    bytes 4096 ..      count token ids

A file whose magic, header, size, fingerprints or digest do not match is rebuilt, never used.

One rank builds (``builder=True``; the trainer picks global rank 0): it writes a temporary file in
the same directory and renames it into place, so a reader never sees half a file. The other ranks
poll for the finished file; they fail with one clear line when the builder reports an error
(through a ``.failed-<nonce>`` file of this attempt in the cache directory) or when the builder's
temporary file has not been touched for ``timeout`` seconds (a builder on another machine that
cannot see the directory, or one that died; a later builder removes such leftovers). A working
builder touches it every few seconds, even inside one long batch. No collective runs while
they wait, so a long tokenization cannot time out a process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from .documents import DataSource, iter_documents
from .tokenizers.base import Tokenizer

__all__ = [
    "CacheOptions", "default_cache_dir", "load_tokens", "read_token_file", "report_failure", "token_file_path",
    "write_token_file",
]  # fmt: skip

MAGIC = b"TPFFNTOK"
VERSION = 1
HEADER_BYTES = 4096
_BATCH_CHARS = 8 << 20  # text handed to one encode_batch call
_BATCH_DOCS = 4096
_POLL_S = 0.2


def default_cache_dir() -> Path:
    env = os.environ.get("TP_FFN_CACHE")
    if env:
        return Path(env) / "tokens"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tp_ffn" / "tokens"


@dataclass(frozen=True)
class CacheOptions:
    """Where the cache lives and how this rank takes part: ``builder`` writes it, the others wait
    (``nonce``: the same string on every rank of this attempt; ``timeout``: seconds without progress)."""

    directory: Path
    builder: bool = True
    nonce: str = "local"
    timeout: float = 600.0
    progress: bool = False
    log: Callable[[str], None] | None = None


def token_file_path(directory: Path, source: DataSource, tokenizer: Tokenizer) -> Path:
    return directory / f"{source.fingerprint}-{tokenizer.fingerprint}.tokens"


def _dtype_for(vocab_size: int) -> tuple[str, torch.dtype, str]:
    """(name, torch dtype, array typecode) of the smallest unsigned type holding every id."""
    if vocab_size <= 1 << 16:
        return "uint16", torch.uint16, "H"
    code = "I" if array("I").itemsize == 4 else "L"
    return "uint32", torch.uint32, code


def _header(fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields, sort_keys=True).encode()
    if len(body) > HEADER_BYTES - len(MAGIC) - 1:
        raise ValueError("token file header too long")
    return MAGIC + body.ljust(HEADER_BYTES - len(MAGIC) - 1) + b"\n"


def _keep_fresh(path: Path, every: float, stop: threading.Event) -> None:
    """Touch ``path`` every ``every`` seconds until ``stop``: the waiting ranks' sign of life."""
    while not stop.wait(every):
        try:
            os.utime(path)
        except OSError:
            return


def write_token_file(
    path: Path, source: DataSource, tokenizer: Tokenizer, *, progress: bool = False, heartbeat: float | None = None
) -> dict[str, Any]:
    """Tokenize every document of ``source`` into ``path`` (atomically); returns the header.

    Documents go through ``tokenizer.encode_batch`` in batches (parallel threads inside the
    tokenizer library) and are framed by :meth:`Tokenizer.document` (BOS / EOS). ``heartbeat``:
    touch the temporary file every that many seconds while working, so that ranks waiting for it
    see progress even during one long batch (a single huge document).
    """
    name, _, code = _dtype_for(tokenizer.vocab_size)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    digest, count, documents = hashlib.sha256(), 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr)
    stop = threading.Event()
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            if heartbeat is not None:
                threading.Thread(target=_keep_fresh, args=(tmp, heartbeat, stop), daemon=True).start()

            def flush(texts: list[str], nbytes: int) -> None:
                nonlocal count, documents
                out = array(code)
                for ids in tokenizer.encode_batch(texts):
                    out.extend(tokenizer.document(ids))
                raw = out.tobytes()
                f.write(raw)
                digest.update(raw)
                count += len(out)
                documents += len(texts)
                if bar is not None:
                    bar.update(nbytes)

            texts: list[str] = []
            chars = pending = 0
            for text, nbytes in iter_documents(source):
                pending += nbytes
                if text:
                    texts.append(text)
                    chars += len(text)
                if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                    flush(texts, pending)
                    texts, chars, pending = [], 0, 0
            flush(texts, pending)
            header = {
                "version": VERSION, "dtype": name, "byteorder": sys.byteorder, "count": count, "documents": documents,
                "data": source.fingerprint, "tokenizer": tokenizer.fingerprint, "sha256": digest.hexdigest(),
            }  # fmt: skip
            f.seek(0)
            f.write(_header(header))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        stop.set()
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)
    return header


def _check(path: Path, data_fp: str, tok_fp: str) -> tuple[dict[str, Any] | None, str]:
    """(header, "") for a sound file, else (None, why not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
                return None, "not a token file (bad magic or short header)"
            try:
                header = json.loads(head[len(MAGIC) :].decode())
            except ValueError:
                return None, "unreadable header"
            if not isinstance(header, dict) or header.get("version") != VERSION:
                return (
                    None,
                    f"format version {header.get('version') if isinstance(header, dict) else '?'}, expected {VERSION}",
                )
            dtype = {"uint16": 2, "uint32": 4}.get(header.get("dtype"))  # type: ignore[arg-type]
            count = header.get("count")
            if dtype is None or not isinstance(count, int) or header.get("byteorder") != sys.byteorder:
                return None, "unknown dtype, count or byte order"
            if header.get("data") != data_fp or header.get("tokenizer") != tok_fp:
                return None, "made from other data or another tokenizer"
            if size != HEADER_BYTES + count * dtype:
                return None, f"{size} bytes, expected {HEADER_BYTES + count * dtype} for {count} tokens"
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
            if digest.hexdigest() != header.get("sha256"):
                return None, "contents do not match the header's sha256"
        return header, ""
    except FileNotFoundError:
        return None, "absent"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"


def read_token_file(path: Path, header: dict[str, Any]) -> Tensor:
    """The checked file's tokens, memory-mapped (read-only use: the mapping is private)."""
    dtype = torch.uint16 if header["dtype"] == "uint16" else torch.uint32
    item = 2 if header["dtype"] == "uint16" else 4
    whole = torch.from_file(str(path), shared=False, size=HEADER_BYTES // item + header["count"], dtype=dtype)
    return whole[HEADER_BYTES // item :]


def _error_file(options: CacheOptions) -> Path:
    return options.directory / f".failed-{options.nonce}"


def report_failure(options: CacheOptions, message: str) -> None:
    """On the builder: tell the waiting ranks of this attempt that it failed, and why."""
    try:
        options.directory.mkdir(parents=True, exist_ok=True)
        tmp = _error_file(options).with_suffix(".tmp")
        tmp.write_text(message)
        os.replace(tmp, _error_file(options))
    except OSError:
        pass  # the waiters then stop at their timeout


def _last_progress(path: Path) -> float:
    """Newest modification time of the builders' temporary files for ``path`` (0 when none)."""
    newest = 0.0
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        try:
            newest = max(newest, tmp.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def _remove_stale(options: CacheOptions, path: Path) -> None:
    """Temporary files of builders that died, and old failure reports: anything of theirs untouched
    for longer than a waiting rank would wait."""
    now = time.time()
    for old in [*path.parent.glob(f"{path.name}.tmp-*"), *options.directory.glob(".failed-*")]:
        try:
            if now - old.stat().st_mtime > options.timeout:
                old.unlink()
        except FileNotFoundError:
            continue


def load_tokens(source: DataSource, tokenizer: Tokenizer, options: CacheOptions) -> Tensor:
    """The token stream of ``source`` under ``tokenizer``, from the cache (built first if needed).

    Raises :class:`UsageError` for data the builder could not read, a cache directory that
    cannot be written, or a builder that makes no progress for ``options.timeout`` seconds.
    """
    log = options.log or (lambda text: None)
    path = token_file_path(options.directory, source, tokenizer)
    if options.builder:
        header, why = _check(path, source.fingerprint, tokenizer.fingerprint)
        if header is not None:
            log(f"token cache: {path} ({header['count']:,} tokens)")
            return read_token_file(path, header)
        try:
            options.directory.mkdir(parents=True, exist_ok=True)
            _remove_stale(options, path)
            log(f"token cache: {'building' if why == 'absent' else f'rebuilding ({why})'} {path}")
            t0 = time.perf_counter()
            header = write_token_file(
                path, source, tokenizer, progress=options.progress, heartbeat=min(5.0, options.timeout / 4)
            )
            dt = time.perf_counter() - t0
            log(
                f"token cache: {header['count']:,} tokens from {header['documents']:,} documents, "
                f"{source.total_bytes / max(dt, 1e-9) / 1e6:.2f} MB/s ({dt:.1f} s)"
            )
        except BaseException as e:
            message = str(e) if isinstance(e, UsageError) else f"--token-cache: building {path} failed: {e}"
            report_failure(options, message)
            if isinstance(e, OSError):
                raise UsageError(message) from None
            raise
        return read_token_file(path, header)

    active = time.monotonic()  # when the builder last showed progress (or when this rank started waiting)
    newest_tmp = _last_progress(path)
    last_seen: tuple[int, int, int] | None = None  # (inode, size, mtime) of a file already found unsound
    while True:
        error = _error_file(options)
        if error.exists():
            raise UsageError(error.read_text().strip() or f"building the token cache {path} failed on rank 0")
        try:
            st = path.stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        if seen is not None and seen != last_seen:
            header, _ = _check(path, source.fingerprint, tokenizer.fingerprint)
            if header is not None:
                return read_token_file(path, header)
            last_seen = seen
            active = time.monotonic()
        tmp_time = _last_progress(path)
        if tmp_time > newest_tmp:
            newest_tmp, active = tmp_time, time.monotonic()
        if time.monotonic() - active > options.timeout:
            raise UsageError(
                f"--token-cache: waited {options.timeout:.0f} s for rank 0 to write {path} without progress; "
                f"is {options.directory} on a file system every rank sees?"
            )
        time.sleep(_POLL_S)
