"""The tensors of a safetensors checkpoint directory, read a block of rows at a time.

``model.safetensors``, or ``model.safetensors.index.json`` with the shards it lists. Every read opens the
file with ``safetensors.safe_open``, copies at most :data:`CHUNK_BYTES` of the stored rows into the
caller's tensor and closes it again: the pages of a memory-mapped file count in the resident set for as
long as the mapping lives, so a reader that kept every file open would hold as much as the whole
checkpoint by the end. Here a rank's peak is what it keeps plus one chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

__all__ = ["CHUNK_BYTES", "SafetensorsDir"]

CHUNK_BYTES = 32 * 2**20
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class SafetensorsDir:
    """Names, shapes and dtypes of every tensor of a checkpoint directory; :meth:`read_into` copies one
    (or a block of its rows / columns) into a tensor the caller owns."""

    def __init__(self, root: Path) -> None:
        from safetensors import safe_open

        self.root = root
        index_path = root / INDEX
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object, got an error: {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: expected 'weight_map' to map tensor names to file names")
            files = sorted(set(weight_map.values()))
        elif (root / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise ValueError(
                f"{root}: expected {SINGLE} or {INDEX} (only safetensors checkpoints are read), found {found[:10]}"
            )
        self.files: list[Path] = []
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for name in files:
            path = root / name
            if Path(name).name != name or not path.is_file():
                raise ValueError(f"{index_path}: lists {name!r}, which is not a file in {root}")
            self.files.append(path)
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        sl = f.get_slice(key)
                        if weight_map is None or weight_map.get(key) == name:
                            self.file_of[key] = path
                            self.shape[key] = tuple(sl.get_shape())
                            self.dtype[key] = sl.get_dtype()
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{path}: expected a safetensors file, got an error: {e}") from None
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.file_of)
            if missing:
                raise ValueError(f"{index_path}: lists tensors its files do not hold: {missing[:10]}")

    def first_float_dtype(self) -> str | None:
        """The dtype (``"bfloat16"`` ...) of the first floating-point tensor of the first file."""
        for key, path in self.file_of.items():
            if path == self.files[0] and self.dtype[key] in FLOAT_DTYPES:
                return FLOAT_DTYPES[self.dtype[key]]
        return None

    def read_into(
        self, key: str, out: Tensor, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> None:
        """``out.copy_(tensor[r0:r1, c0:c1])`` (cast to ``out``'s dtype and device), ``CHUNK_BYTES`` of stored
        rows at a time. ``rows`` / ``cols`` default to the whole dimension; ``cols`` needs a 2-D tensor."""
        from safetensors import safe_open

        shape = self.shape[key]
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        if not shape:
            with safe_open(str(self.file_of[key]), framework="pt", device="cpu") as f:
                out.copy_(f.get_tensor(key))
            return
        row_bytes = _ELEMENT_BYTES.get(self.dtype[key], 8)
        for n in shape[1:]:
            row_bytes *= n
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            with safe_open(str(self.file_of[key]), framework="pt", device="cpu") as f:
                sl = f.get_slice(key)
                block = sl[a:b] if cols is None else sl[a:b, cols[0] : cols[1]]
                out[a - r0 : b - r0].copy_(block)
                del block, sl
