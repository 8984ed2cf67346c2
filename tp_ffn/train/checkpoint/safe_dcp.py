"""Reading DCP checkpoint directories that may come from anyone: no pickled code runs.

What ``torch.distributed.checkpoint.FileSystemReader`` does by default (torch 2.4 to 2.13), and what
:class:`SafeFileSystemReader` does instead:

=======================================  ==========================================================
DCP's default                            here
=======================================  ==========================================================
``.metadata``: ``pickle.load``           an unpickler that builds only the classes DCP's index is
                                         made of (:data:`ALLOWED_GLOBALS`) and sets state only on
                                         instances of DCP's metadata dataclasses; ``getattr`` only
                                         as an enum member by name (how Python 3.11.0-3.11.x, e.g.
                                         Debian 12's 3.11.2, pickle enums), paths under the names
                                         of every Python (``pathlib._local`` from 3.13)
bytes entries: ``torch.load(...,         refused: in the index (``BytesStorageMetadata``) and in
weights_only=False)`` in the planner     ``read_data`` (``LoadItemType.BYTE_IO``)
tensor records: ``torch.load(...,        read here, with ``weights_only=True`` given explicitly
weights_only=True)`` in 2.13             (not left to a release's DCP or default, nor to
                                         ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), after checking that
                                         each record is a ``torch.save`` zip archive of stored
                                         (uncompressed) members no larger than the record; an
                                         ``UnpicklingError`` is a refusal
``relative_path`` joined to the          a plain file name of a regular file in the directory;
directory as written                     offset and length inside it, records not overlapping
stream transforms (``_extension``)       refused (nothing here writes them)
=======================================  ==========================================================

The index is also checked for consistency: every tensor's chunks lie inside it and add up to it,
and every chunk has a record at least as long as its bytes. So the memory a load allocates is
bounded by the bytes on disk, whatever the index claims.

Errors: :class:`UnsafeCheckpointError` ("... was refused as unsafe (...); nothing in it ran") and
:class:`DamagedCheckpointError` ("checkpoint DIR is damaged: ..."), both one line and both
:class:`~tp_ffn.train.config.UsageError`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import enum
import io
import itertools
import math
import os
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_md
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from ...files import regular_size
from ..errors import UsageError
from .digests import file_digest

__all__ = [
    "ALLOWED_GLOBALS",
    "DamagedCheckpointError",
    "SafeFileSystemReader",
    "UnsafeCheckpointError",
    "check_index",
    "damaged",
    "is_count",
    "is_plain_name",
    "read_index",
    "regular_file_size",
    "unsafe",
    "unwrap_refusal",
]

INDEX = ".metadata"
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeCheckpointError(UsageError):
    """A checkpoint file asked for more than data (code, or files outside its directory); nothing in it ran."""


class DamagedCheckpointError(UsageError):
    """A checkpoint file is missing, truncated, or disagrees with its digest or with the index."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unsafe(root: str | os.PathLike, name: str, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint {root}: {name} was refused as unsafe ({_one_line(reason)}); nothing in it ran"
    )


def damaged(root: str | os.PathLike, reason: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint {root} is damaged: {_one_line(reason)}")


def regular_file_size(path: Path) -> int | None:
    """Size of the regular file at ``path`` (links followed); ``None`` when nothing is there;
    :class:`DamagedCheckpointError` for a directory, FIFO, device, socket or link loop."""
    return regular_size(path, lambda why: damaged(path.parent, f"{path.name} {why}"))


# --------------------------------------------------------------------------------------------------
# The restricted unpickler


def _layout_by_name(name: str) -> torch.layout:
    """Stands in for ``torch.serialization._get_layout``: a lookup among torch's layouts, nothing else."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise _Refused(f"it names an unknown layout {name!r}")
    return layouts[name]


# The dataclasses DCP writes into .metadata (torch/distributed/checkpoint/metadata.py and
# filesystem.py), the only objects whose state the index may set.
_DCP_DATACLASSES: tuple[type, ...] = (
    Metadata, StorageMeta, TensorStorageMetadata, ChunkStorageMetadata, TensorProperties, BytesStorageMetadata,
    MetadataIndex, _dcp_fs._StorageInfo,
)  # fmt: skip


# The enums the index may hold; each member may come pickled by value, ``E(value)`` (Python 3.10,
# 3.11.7 and later 3.11s, 3.12, 3.13) or by name, ``getattr(E, "NAME")`` (3.11.0 to 3.11.x, e.g.
# Debian 12's 3.11.2): see :func:`_enum_member`.
_ENUMS: tuple[type[enum.Enum], ...] = (
    _dcp_md._MEM_FORMAT_ENCODING,  # TensorProperties pickles its memory format as this enum
)


def _enum_member(*args: Any) -> enum.Enum:
    """Stands in for ``builtins.getattr``, and does only what an enum member pickled by name needs:
    ``getattr(E, name)`` where ``E`` is one of :data:`_ENUMS` and ``name`` one of its members.
    Anything else ``getattr`` could reach (an attribute that is not a member, a function's
    ``__globals__``, a default value, a class not listed) is refused: it is a pickle gadget's first step.
    """
    if len(args) != 2:
        raise _Refused(f"it calls builtins.getattr with {len(args)} arguments; an enum member by name has 2")
    cls, name = args
    if not any(cls is e for e in _ENUMS):
        raise _Refused(f"it calls builtins.getattr on a {type(cls).__name__}, not on an enum of the index")
    member = cls.__members__.get(name) if isinstance(name, str) else None
    if member is None or type(member) is not cls:
        raise _Refused(f"it calls builtins.getattr for {name!r}, which is not a member of {cls.__qualname__}")
    return member


def _allowed_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c for c in _DCP_DATACLASSES + _ENUMS}
    out[("builtins", "getattr")] = _enum_member
    out[("torch", "Size")] = torch.Size
    out[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id is a str or a path (FileSystemWriter stores a Path). Python 3.13 pickles
    # the paths as pathlib._local.*, earlier ones as pathlib.*: both names, whichever writes. A path of
    # the other operating system cannot be built here (WindowsPath on Linux raises), so its pure form
    # stands in: the index never uses it as a path.
    for cls in (pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.WindowsPath):
        here = cls
        if cls is pathlib.WindowsPath and os.name != "nt":
            here = pathlib.PureWindowsPath
        elif cls is pathlib.PosixPath and os.name == "nt":
            here = pathlib.PurePosixPath
        for module in ("pathlib", "pathlib._local", cls.__module__):
            out[(module, cls.__name__)] = here
    for name, value in vars(torch).items():  # dtypes (torch.float32 pickles as the global torch.float32), ...
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            out[("torch", name)] = value
    out[("torch.serialization", "_get_layout")] = _layout_by_name  # ... and layouts by name since torch 2.6
    return out


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class _Refused(Exception):
    """Raised inside the unpickler: the pickle asked for something outside the index's vocabulary."""


class _IndexUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, whose opcodes can be overridden one by one), with
    globals limited to :data:`ALLOWED_GLOBALS` and BUILD limited to DCP's metadata dataclasses.

    Limiting BUILD matters: the C unpickler applies a state to whatever object is on the stack, a
    class or function included, which would let a pickle rewrite the attributes of an allowed class.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names (__builtin__, copy_reg), as pickle maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise _Refused(f"it asks for {module}.{name}, which is not part of a DCP index")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it asks for a persistent object, which a DCP index never holds")

    def _load_build(self) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if type(inst) not in _DCP_DATACLASSES:
            raise _Refused(f"it sets the state of a {type(inst).__name__}, not of DCP metadata")
        if getattr(inst, "__setstate__", None) is None:
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            for part in parts:
                keys = part.keys() if isinstance(part, dict) else ()
                if any(not isinstance(k, str) or k.startswith("__") for k in keys):
                    raise _Refused("it sets a special attribute of DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = _load_build


# --------------------------------------------------------------------------------------------------
# Reading and checking the index


def read_index(
    root: str | os.PathLike, *, sizes: Mapping[str, int] | None = None, digest: str | None = None
) -> Metadata:
    """The DCP index ``root/.metadata``, unpickled with the restricted unpickler and checked by :func:`check_index`.

    ``sizes`` (``{file name: bytes}``, e.g. from ``meta.json``) lists the files the checkpoint may
    refer to; ``None``: the regular files in ``root``. ``digest``: the expected
    :func:`~tp_ffn.train.checkpoint.digests.file_digest` of ``.metadata``, checked before it is unpickled.
    """
    root = Path(root)
    if sizes is None:
        sizes = {p.name: size for p in sorted(root.iterdir()) if (size := _size_if_regular(p)) is not None}
    path = root / INDEX
    size = regular_file_size(path)
    if size is None:
        raise damaged(root, f"{INDEX} is missing")
    if INDEX in sizes and size != sizes[INDEX]:
        raise damaged(root, f"{INDEX} is {size} bytes, expected {sizes[INDEX]} bytes")
    if digest is not None and file_digest(path) != digest:
        raise damaged(root, f"{INDEX} does not match its digest")
    try:
        with open(path, "rb") as f:
            md = _IndexUnpickler(f).load()
    except _Refused as e:
        raise unsafe(root, INDEX, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any other failure of a pickle from disk means damage
        raise damaged(root, f"{INDEX} is not a DCP index ({type(e).__name__}: {e})") from None
    check_index(md, sizes, root)
    return md


def _size_if_regular(p: Path) -> int | None:
    try:
        return regular_size(p, ValueError)
    except ValueError:  # not a regular file: not one the checkpoint can refer to
        return None


def is_plain_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside a directory (no separators, not ``.`` or ``..``)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def is_count(v: object) -> bool:
    """Whether ``v`` is an int >= 0 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_shape(v: object, ndim: int | None = None) -> bool:
    return isinstance(v, torch.Size) and all(is_count(x) for x in v) and (ndim is None or len(v) == ndim)


def check_index(md: object, sizes: Mapping[str, int], root: str | os.PathLike) -> None:
    """Raise unless ``md`` is an index of tensors only, whose records lie in the files of ``sizes``.

    Checked: every entry is a tensor (a bytes entry is refused as unsafe: it would be unpickled with
    ``weights_only=False``); its chunks lie inside it and add up to it; each chunk has a record in a
    listed file, inside the file, at least as long as the chunk's bytes; records do not overlap; no
    record asks for a stream transform.
    """
    if not isinstance(md, Metadata):
        raise damaged(root, f"{INDEX} holds a {type(md).__name__}, not a DCP index")
    entries, records = md.state_dict_metadata, md.storage_data
    if not isinstance(entries, dict) or not isinstance(records, dict):
        raise damaged(root, f"{INDEX} has no table of entries and records")
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        raise damaged(root, f"{INDEX} has a {type(md.storage_meta).__name__} where DCP keeps its StorageMeta")
    spans: dict[str, list[tuple[int, int]]] = {}
    for index, rec in records.items():
        if not isinstance(index, MetadataIndex) or not isinstance(rec, _dcp_fs._StorageInfo):
            raise damaged(root, f"{INDEX} has a record that is not DCP's ({type(rec).__name__})")
        name = rec.relative_path
        if not is_plain_name(name):
            raise unsafe(root, INDEX, f"a record points outside the checkpoint directory: {name!r}")
        if rec.transform_descriptors:
            raise unsafe(root, INDEX, f"a record asks for stream transforms {list(rec.transform_descriptors)!r}")
        if name not in sizes:
            raise damaged(root, f"{INDEX} refers to {name}, which the checkpoint does not hold")
        if not (is_count(rec.offset) and is_count(rec.length)) or rec.offset + rec.length > sizes[name]:
            raise damaged(root, f"{INDEX} puts a record of {index.fqn!r} past the end of {name}")
        spans.setdefault(name, []).append((rec.offset, rec.length))
    for name, file_spans in spans.items():
        file_spans.sort()
        for (a, n), (b, _) in itertools.pairwise(file_spans):
            if b < a + n:
                raise damaged(root, f"{INDEX} has overlapping records in {name}")
    for fqn, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            raise unsafe(
                root, INDEX,
                f"entry {fqn!r} is stored as pickled bytes, which DCP would unpickle with weights_only=False; "
                f"tp_ffn checkpoints hold tensors only",
            )  # fmt: skip
        _check_tensor_entry(fqn, entry, records, root)


def _check_tensor_entry(fqn: object, entry: object, records: Mapping[Any, Any], root: str | os.PathLike) -> None:
    if not isinstance(fqn, str) or not isinstance(entry, TensorStorageMetadata):
        raise damaged(root, f"{INDEX} has an entry {fqn!r} that is neither a tensor nor bytes ({type(entry).__name__})")
    props, size = entry.properties, entry.size
    if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype) or not _is_shape(size):
        raise damaged(root, f"{INDEX} describes {fqn!r} with an invalid dtype or shape")
    if not isinstance(entry.chunks, list):
        raise damaged(root, f"{INDEX} has no chunk list for {fqn!r}")
    covered = 0
    for chunk in entry.chunks:
        if (
            not isinstance(chunk, ChunkStorageMetadata)
            or not _is_shape(chunk.offsets, len(size))
            or not _is_shape(chunk.sizes, len(size))
            or any(o + n > s for o, n, s in zip(chunk.offsets, chunk.sizes, size))
        ):
            raise damaged(root, f"{INDEX} has a chunk of {fqn!r} outside its shape {tuple(size)}")
        rec = records.get(MetadataIndex(fqn, chunk.offsets))
        numel = math.prod(chunk.sizes)
        if rec is None or numel * props.dtype.itemsize > rec.length:
            raise damaged(root, f"{INDEX} has no record long enough for a chunk of {fqn!r}")
        covered += numel
    if covered != math.prod(size):
        raise damaged(
            root,
            f"{INDEX}: the chunks of {fqn!r} hold {covered} elements, its shape {tuple(size)} needs {math.prod(size)}",
        )


# --------------------------------------------------------------------------------------------------
# The storage reader


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open binary file, as a seekable file of their own."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        if base + pos < 0:
            raise OSError("seek before the start of the record")
        self.pos = min(base + pos, self.length)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b).cast("B")[:n])
        self.pos += got
        return got


def _check_record(f: BinaryIO, offset: int, length: int) -> str | None:
    """Why the record is not a ``torch.save`` zip of stored members within its length (``None``: it is).

    ``torch.load`` allocates what a zip member or a legacy-format record declares before reading it;
    stored members no larger than the record keep that within the bytes on disk.
    """
    f.seek(offset)
    if f.read(4) != _ZIP_MAGIC:
        return "it is not a torch.save zip archive"
    try:
        with zipfile.ZipFile(_Window(f, offset, length)) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"it is not a readable zip archive ({e})"
    if any(m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size for m in members):
        return "it holds compressed members, which torch.save never writes"
    if sum(m.file_size for m in members) > length:
        return "its members claim more bytes than it holds"
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` for checkpoints from anywhere: see the module docstring for what changes.

    ``sizes``: ``{file name: bytes}`` the checkpoint may refer to (e.g. from ``meta.json``); ``None``:
    the regular files in ``path``. ``metadata_digest``: the expected digest of ``.metadata``. The
    index is read and checked once, on the first :meth:`read_metadata` (call it before ``dcp.load``
    to get a refusal as a plain exception rather than wrapped in DCP's ``CheckpointException``).
    Use it wherever ``dcp.FileSystemReader(path)`` was used::

        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        sizes: Mapping[str, int] | None = None,
        metadata_digest: str | None = None,
    ) -> None:
        super().__init__(path)
        self.root = Path(path)
        self._sizes = None if sizes is None else dict(sizes)
        self._metadata_digest = metadata_digest
        self._index: Metadata | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and Path(checkpoint_id) != self.root:
            raise ValueError(f"SafeFileSystemReader for {self.root} cannot read {checkpoint_id}: make a new one")
        super().reset(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank indexes, which nothing here writes
            raise damaged(self.root, f"it has no per-rank index __{kwargs['rank']}{INDEX}")
        if self._index is None:
            self._index = read_index(self.root, sizes=self._sizes, digest=self._metadata_digest)
        md = self._index
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each tensor record read with ``torch.load(weights_only=True)`` given explicitly (so neither
        this torch's default nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` can turn it off), after
        :func:`_check_record`; then narrowed to the requested piece and copied where the planner says,
        as DCP's own ``read_data`` does. A bytes entry is refused."""
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise unsafe(self.root, INDEX, f"entry {item.dest_index.fqn!r} would be unpickled from bytes")
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            with open(self.root / name, "rb") as f:
                for item in items:
                    self._read_tensor(f, name, item, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_tensor(self, f: BinaryIO, name: str, item: Any, planner: LoadPlanner) -> None:
        rec, fqn = self.storage_data[item.storage_index], item.storage_index.fqn
        why = _check_record(f, rec.offset, rec.length)
        if why is not None:
            raise damaged(self.root, f"{name}: the record of {fqn!r}: {why}")
        try:
            tensor = torch.load(_Window(f, rec.offset, rec.length), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # the weights-only unpickler met more than tensor data
            raise unsafe(self.root, name, f"a tensor record asks for more than tensor data: {e}") from None
        if not isinstance(tensor, torch.Tensor):
            raise damaged(self.root, f"{name}: the record of {fqn!r} holds a {type(tensor).__name__}, not a tensor")
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise damaged(
                self.root, f"{name}: the record of {fqn!r} gives {tuple(tensor.shape)}, not {tuple(target.shape)}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)


def unwrap_refusal(e: BaseException) -> UsageError | None:
    """The :class:`UnsafeCheckpointError` / :class:`DamagedCheckpointError` inside DCP's
    ``CheckpointException`` (which carries every rank's failure), if there is one."""
    if isinstance(e, (UnsafeCheckpointError, DamagedCheckpointError)):
        return e
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, (UnsafeCheckpointError, DamagedCheckpointError)):
                return exc
    return None
