"""Reading Meta's ``consolidated.XX.pth`` shards: memory-mapped, ``weights_only`` (no pickled code runs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from ..sharding import ShardSpec
from .weight_names import META_EMBEDDING_SPLITS, META_IGNORED, META_SHARD, WeightEntry

__all__ = ["MetaReader", "load_torch_file", "meta_shard_files"]


def load_torch_file(file: Path) -> dict[str, Tensor]:
    """``torch.load`` that runs no pickled code and maps the file instead of reading it."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{file}: refused: its pickle asks for more than tensors and plain containers (it may carry "
            f"code, which was not run). Only weights_only checkpoints are loaded. ({first})"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip, mmap and I/O errors all mean "not a checkpoint we read"
        raise ValueError(f"{file}: cannot be read as a torch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError(f"{file}: expected a dict of str to Tensor (a Meta state dict), got {type(obj).__name__}")
    return obj


def meta_shard_files(root: Path) -> list[Path]:
    found = {}
    for p in root.iterdir():
        m = META_SHARD.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ValueError(f"{root}: no consolidated.XX.pth files")
    if sorted(found) != list(range(len(found))):
        absent = sorted(set(range(max(found) + 1)) - set(found))
        raise ValueError(
            f"{root}: model-parallel shards are missing: no consolidated.{absent[0]:02d}.pth (found {sorted(found)})"
        )
    return [found[i] for i in range(len(found))]


class MetaReader:
    """The tensors of Meta's ``consolidated.XX.pth`` shards, memory-mapped; slices cross shard borders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = meta_shard_files(root)
        self.shards = [load_torch_file(f) for f in self.files]
        self.split: dict[str, int | None] = {}

    def validate(self, layout: list[WeightEntry]) -> None:
        expected = {e.name for e in layout}
        problems = []
        for file, shard in zip(self.files, self.shards):
            present = set(shard) - META_IGNORED
            missing = [k for k in (e.name for e in layout) if k not in present]
            extra = sorted(present - expected)
            if missing or extra:
                problems.append(f"{file.name}: missing keys {missing}, unexpected keys {extra}")
        if problems:
            raise ValueError(f"{self.root}: " + "; ".join(problems))
        bad = []
        for e in layout:
            shapes = [tuple(s[e.name].shape) for s in self.shards]
            if any(not s[e.name].is_floating_point() for s in self.shards):
                bad.append(f"{e.name}: expected a floating-point tensor in every shard")
                continue
            # tok_embeddings: dim 1 in Llama 1/2 (ParallelEmbedding), dim 0 in Llama 3 (VocabParallelEmbedding).
            candidates = [e.meta_dim] if e.name != "tok_embeddings.weight" else list(META_EMBEDDING_SPLITS.values())
            self.split[e.name] = next((d for d in candidates if _fits(shapes, e.shape, d)), -1)
            if self.split[e.name] == -1:
                how = "in every shard" if e.meta_dim is None else f"split over {len(shapes)} shards on dim {e.meta_dim}"
                bad.append(f"{e.name}: expected full shape {e.shape} {how}, got shard shapes {shapes}")
        if bad:
            raise ValueError(f"{self.root}: " + "; ".join(bad))

    def read(self, e: WeightEntry, spec: ShardSpec, head_dim: int) -> Tensor:
        """This rank's blocks of ``e`` (``spec``), wherever Meta's shard borders fall; a new tensor that
        refers to nothing of the mapped files."""
        del head_dim  # Meta's rows are already in the model's convention
        d = self.split[e.name]
        if d is None:  # every Meta shard holds the whole tensor
            return spec.take(self.shards[0][e.name], copy=True)
        if spec.dim == d:  # only the ranges this rank holds, from the Meta shards they cross
            return torch.cat([self._span(e.name, d, s, end) for s, end in spec.blocks], d)
        return spec.take(self._span(e.name, d, 0, e.shape[d]), copy=spec.is_sharded)

    def _span(self, name: str, d: int, lo: int, hi: int) -> Tensor:
        """``full[lo:hi]`` along Meta's split dim ``d``, a new tensor made of the Meta shards it crosses."""
        parts, offset = [], 0
        for shard in self.shards:
            p = shard[name]
            a, b = max(lo, offset), min(hi, offset + p.shape[d])
            if a < b:
                parts.append(p.narrow(d, a - offset, b - a))
            offset += p.shape[d]
        return torch.cat(parts, d)  # a copy: nothing refers to the mapped file afterwards


def _fits(shapes: list[tuple[int, ...]], full: tuple[int, ...], d: int | None) -> bool:
    if d is None:
        return all(s == full for s in shapes)
    others = [i for i in range(len(full)) if i != d]
    return (
        all(len(s) == len(full) and all(s[i] == full[i] for i in others) for s in shapes)
        and sum(s[d] for s in shapes) == full[d]
    )
