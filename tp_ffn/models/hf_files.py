"""Reading a Hugging Face safetensors checkpoint lazily, one slice at a time (``safe_open(...).get_slice``)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import Tensor

from .pretrained_config import read_json_object
from .weight_names import HF_FLOAT_DTYPES, HF_IGNORED_SUFFIX, HF_INDEX, HF_SINGLE, WeightEntry, hf_to_meta_rows

__all__ = ["HFReader"]


class HFReader:
    """The tensors of a Hugging Face safetensors checkpoint, read lazily with ``get_slice``."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.root = root
        index_path, single = root / HF_INDEX, root / HF_SINGLE
        if index_path.exists():
            index = read_json_object(index_path, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: expected a 'weight_map' object of tensor name to file name")
            outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in (".", "..")})
            if outside:
                raise ValueError(f"{index_path}: names files outside {root}: {outside[:3]}")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, files = None, [HF_SINGLE]
        else:
            raise ValueError(f"{root}: no {HF_SINGLE} or {HF_INDEX} (only safetensors checkpoints are read)")
        self.handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        for name in files:
            file = root / name
            if not file.is_file():
                where = f"{index_path}: lists {name}, which" if weight_map is not None else f"{file}:"
                raise ValueError(f"{where} is not a regular file in {root}")
            try:
                self.handles[name] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
            for key in self.handles[name].keys():
                if weight_map is None:
                    self.where[key] = name
        if weight_map is not None:
            held = {name: set(h.keys()) for name, h in self.handles.items()}
            for key, name in weight_map.items():
                if key not in held[name]:
                    raise ValueError(f"{index_path}: says {key} is in {name}, which does not hold it")
                self.where[key] = name

    def stored_elements(self) -> int:
        """Elements of every tensor in the files, from their headers (nothing is read or allocated)."""
        return sum(math.prod(self._slice(key).get_shape()) for key in self.where)

    def _slice(self, key: str) -> Any:
        return self.handles[self.where[key]].get_slice(key)

    def validate(self, layout: list[WeightEntry]) -> None:
        expected = {e.hf: e for e in layout}
        present = {k for k in self.where if not k.endswith(HF_IGNORED_SUFFIX)}
        missing = [k for k in expected if k not in present]
        extra = sorted(present - set(expected))
        if missing or extra:
            raise ValueError(f"{self.root}: missing keys {missing}, unexpected keys {extra}")
        bad = []
        for key, e in expected.items():
            sl = self._slice(key)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if shape != e.shape:
                bad.append(f"{key}: expected shape {e.shape}, got {shape}")
            elif dtype not in HF_FLOAT_DTYPES:
                bad.append(f"{key}: expected a floating-point dtype, got {dtype}")
        if bad:
            raise ValueError(f"{self.root}: " + "; ".join(bad))

    def read(self, e: WeightEntry, dim: int | None, start: int, end: int, head_dim: int) -> Tensor:
        sl = self._slice(e.hf)
        if dim is None:
            x = sl[:]
        elif dim == 0:
            x = sl[start:end]
        else:
            x = sl[:, start:end]
        x = hf_to_meta_rows(x, head_dim) if e.heads is not None else x
        # A copy: a slice may be a view of the file's mapping, which would then stay mapped (and
        # resident) as long as the parameter lives and follow the file if it were rewritten in place.
        return x.clone()
