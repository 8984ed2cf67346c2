"""The one safetensors reader: a checkpoint directory's tensors, this rank's blocks only, a chunk at a time.

``model.safetensors``, or ``model.safetensors.index.json`` with the files it lists. The constructor reads
every file's header (names, shapes, dtypes: nothing else). :meth:`SafetensorsDir.read_into` copies a
tensor, or the blocks a :class:`~tp_ffn.sharding.ShardSpec` says this rank holds, into a tensor the
caller owns (or one per block), at most :data:`CHUNK_BYTES` of stored rows per step, opening the file with
``safetensors.safe_open`` for each step and closing it again; :meth:`SafetensorsDir.read_many` does many
such reads, a file kept open across them for up to :data:`CHUNK_BYTES`. The pages of a memory-mapped file count
in the resident set for as long as the mapping lives, so a reader that kept its files open would hold
as much as the whole checkpoint by the end; here a rank's peak is what it keeps plus one chunk
(``tests/hf/test_hf_memory.py``, ``tests/models/test_load_pretrained.py``, ``benchmarks/hf_memory.py`` measure it).
Reopening costs one header parse per chunk, small beside the chunk it reads.

Used by both ``tp_ffn.hf`` (any transformers model) and ``tp_ffn.models`` (the Llama layouts); it imports
only the core's :mod:`tp_ffn.sharding` and :mod:`tp_ffn.files`, and ``safetensors`` when a directory is opened.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .files import read_json_object, regular_size
from .sharding import ShardSpec

__all__ = ["CHUNK_BYTES", "FLOAT_DTYPES", "INDEX", "SINGLE", "SafetensorsDir"]

CHUNK_BYTES = 32 * 2**20
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# safetensors' dtype names -> torch's.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_TORCH_DTYPES = {
    **FLOAT_DTYPES, "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class SafetensorsDir:
    """Names, shapes and dtypes of every tensor of a safetensors checkpoint directory; :meth:`read_into`
    copies one (or this rank's blocks of it) into a tensor the caller owns.

    ``shape[key]``, ``dtype[key]`` (safetensors' names: ``"BF16"`` ...) and ``file_of[key]`` hold the
    headers, in the files' order. Raises ``ValueError`` naming the file for a directory without a
    safetensors checkpoint, an index naming files outside ``root`` or tensors its files lack, and a file
    safetensors cannot read.
    """

    def __init__(self, root: str | Path) -> None:
        from safetensors import safe_open

        self.root = root = Path(root)
        index_path = root / INDEX
        if regular_size(index_path, lambda why: ValueError(f"{index_path}: the safetensors index {why}")) is not None:
            weight_map = read_json_object(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: expected a 'weight_map' object of tensor name to file name")
            outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in (".", "..")})
            if outside:
                raise ValueError(f"{index_path}: names files outside {root}: {outside[:3]}")
            names = sorted(set(weight_map.values()))
        elif (root / SINGLE).exists():
            weight_map, names = None, [SINGLE]
        else:
            found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise ValueError(
                f"{root}: expected {SINGLE} or {INDEX} (only safetensors checkpoints are read), found {found[:10]}"
            )
        self.files: list[Path] = []
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for name in names:
            file = root / name
            where = f"{index_path}: lists {name}, which" if weight_map is not None else f"{file}:"
            if regular_size(file, lambda why, w=where: ValueError(f"{w} {why}")) is None:
                raise ValueError(f"{where} is not a regular file in {root}")
            self.files.append(file)
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    held = set(f.keys())
                    for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        if weight_map is None or weight_map.get(key) == name:
                            sl = f.get_slice(key)
                            self.file_of[key], self.dtype[key] = file, sl.get_dtype()
                            self.shape[key] = tuple(sl.get_shape())
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
            if weight_map is not None:
                lacking = [k for k, v in weight_map.items() if v == name and k not in held]
                if lacking:
                    raise ValueError(f"{index_path}: says {lacking[0]} is in {name}, which does not hold it")

    def first_float_dtype(self) -> str | None:
        """The dtype (``"bfloat16"`` ...) of the first floating-point tensor of the first file."""
        for key, path in self.file_of.items():
            if path == self.files[0] and self.dtype[key] in FLOAT_DTYPES:
                return FLOAT_DTYPES[self.dtype[key]]
        return None

    def stored_elements(self) -> int:
        """Elements of every tensor in the files, from their headers (nothing is read or allocated)."""
        return sum(math.prod(shape) for shape in self.shape.values())

    def torch_dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` as a ``torch.dtype``."""
        name = _TORCH_DTYPES.get(self.dtype[key])
        if name is None or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"{self.file_of[key]}: {key}: dtype {self.dtype[key]} cannot be read into torch")
        return getattr(torch, name)

    @contextmanager
    def _open(self, path: Path) -> Iterator[Any]:
        """``path`` (one of :attr:`files`), open for one chunk only (see the module docstring)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f

    def read(self, key: str, spec: ShardSpec | None = None) -> Tensor:
        """A new tensor in the stored dtype holding ``key``, or the blocks ``spec`` says (:meth:`read_into`)."""
        spec = ShardSpec.replicated(self.shape[key]) if spec is None else spec
        out = torch.empty(spec.local_shape, dtype=self.torch_dtype(key))
        self.read_into(key, out, spec)
        return out

    def read_into(self, key: str, out: Tensor | Sequence[Tensor], spec: ShardSpec | None = None) -> None:
        """``out.copy_(spec.take(tensor))`` (cast to ``out``'s dtype and device) without ever holding more
        of ``key`` than :data:`CHUNK_BYTES` of its stored rows (dim 0). ``spec`` (default: the whole
        tensor) must describe the stored shape and ``out`` its local shape; or ``out`` is one tensor per
        block of ``spec`` (:meth:`~tp_ffn.sharding.ShardSpec.take_blocks`), e.g. a fused gate/up's two
        blocks read straight into w1 and w3."""
        self.read_many([(key, out, spec)])

    def read_many(self, reads: Iterable[tuple[str, Tensor | Sequence[Tensor], ShardSpec | None]]) -> None:
        """:meth:`read_into` for every ``(key, out, spec)``, each file opened once for as many of its reads
        as fit in :data:`CHUNK_BYTES` of stored rows (then reopened, as one large tensor is): a layer of
        many small tensors, such as one per expert, is read without an open per tensor, and the peak is
        still one chunk. Every read is checked before the first byte is read."""
        steps = [step for key, out, spec in reads for step in self._steps(key, out, spec)]
        order = {path: i for i, path in enumerate(self.files)}
        steps.sort(key=lambda step: order[step[0]])  # stable: a file's reads keep their order
        at, used, opened = None, 0, contextlib.ExitStack()
        with opened:
            for path, nbytes, copy in steps:
                if path != at or used + nbytes > CHUNK_BYTES:
                    opened.close()  # the previous file: its pages leave the resident set
                    f = opened.enter_context(self._open(path))
                    at, used = path, 0
                copy(f)
                used += nbytes

    def _steps(
        self, key: str, out: Tensor | Sequence[Tensor], spec: ShardSpec | None
    ) -> list[tuple[Path, int, Callable[[Any], None]]]:
        """``(file, stored bytes touched, copy(open file))`` for each chunk of ``key``'s read, checked."""
        shape = self.shape[key]
        spec = ShardSpec.replicated(shape) if spec is None else spec
        if spec.shape != shape:
            raise ValueError(f"{self.file_of[key]}: {key}: expected shape {spec.shape}, got {shape}")
        pieces = self._pieces(key, out, spec)
        file, itemsize = self.file_of[key], self.torch_dtype(key).itemsize
        if not shape:
            return [(file, itemsize, lambda f: pieces[0].copy_(f.get_tensor(key)))]
        # Row ranges (dim 0) to read and where they go; a split along another dim reads every row, its blocks only.
        if spec.dim is None:
            rows, cols = [(0, shape[0], pieces[0])], []
        elif spec.dim == 0:
            rows, cols = [(s, e, p) for (s, e), p in zip(spec.blocks, pieces)], []
        else:
            rows, cols = [(0, shape[0], None)], [(s, e, p) for (s, e), p in zip(spec.blocks, pieces)]
        row_bytes = itemsize * math.prod(shape[1:])
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        out_steps = []
        for start, end, piece in rows:
            for a in range(start, end, step):
                b = min(a + step, end)
                if piece is not None:
                    copy = functools.partial(_copy_rows, key, a, b, piece[a - start : b - start])
                else:
                    copy = functools.partial(_copy_blocks, key, a, b, spec.dim, cols)
                out_steps.append((file, (b - a) * row_bytes, copy))
        return out_steps

    @staticmethod
    def _pieces(key: str, out: Tensor | Sequence[Tensor], spec: ShardSpec) -> list[Tensor]:
        """Where each block of ``spec`` goes (one tensor when replicated), each checked against its shape."""
        if isinstance(out, Tensor):
            if tuple(out.shape) != spec.local_shape:
                raise ValueError(f"out: expected shape {spec.local_shape} for {key}, got {tuple(out.shape)}")
            return [out] if spec.dim is None else [out.narrow(spec.dim, at, e - s) for s, e, at in spec.ranges()]
        pieces = list(out)
        wanted = [spec.shape] if spec.dim is None else [
            spec.shape[: spec.dim] + (e - s,) + spec.shape[spec.dim + 1 :] for s, e in spec.blocks
        ]  # fmt: skip
        got = [tuple(p.shape) for p in pieces]
        if got != wanted:
            raise ValueError(f"out: expected one tensor per block of {key}, shaped {wanted}, got {got}")
        return pieces


def _copy_rows(key: str, a: int, b: int, dest: Tensor, f: Any) -> None:
    dest.copy_(f.get_slice(key)[a:b])


def _copy_blocks(key: str, a: int, b: int, dim: int, cols: list[tuple[int, int, Tensor]], f: Any) -> None:
    sl = f.get_slice(key)
    for s, e, piece in cols:
        piece[a:b].copy_(sl[(slice(a, b), *(slice(None),) * (dim - 1), slice(s, e))])
