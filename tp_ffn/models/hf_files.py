"""A Hugging Face ``LlamaForCausalLM`` safetensors checkpoint in the Llama layout, on the one safetensors
reader (:class:`tp_ffn.safetensors_dir.SafetensorsDir`): checked against :func:`weight_layout`, read block
by block as the model's :class:`~tp_ffn.sharding.ShardSpec` says, q/k rows put back in Meta's order."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..safetensors_dir import SafetensorsDir
from ..sharding import ShardSpec
from .weight_names import HF_FLOAT_DTYPES, HF_IGNORED_SUFFIX, WeightEntry, hf_to_meta_rows

__all__ = ["HFReader"]


class HFReader:
    """The tensors of a Hugging Face safetensors checkpoint, by their Llama layout entries."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = SafetensorsDir(root)

    def stored_elements(self) -> int:
        """Elements of every tensor in the files, from their headers (nothing is read or allocated)."""
        return self.files.stored_elements()

    def validate(self, layout: list[WeightEntry]) -> None:
        expected = {key: shape for e in layout for key, shape in e.hf_tensors().items()}
        present = {k for k in self.files.shape if not k.endswith(HF_IGNORED_SUFFIX)}
        missing = [k for k in expected if k not in present]
        extra = sorted(present - set(expected))
        if missing or extra:
            raise ValueError(f"{self.root}: missing keys {missing}, unexpected keys {extra}")
        bad = []
        for key, expected_shape in expected.items():
            shape, dtype = self.files.shape[key], self.files.dtype[key]
            if shape != expected_shape:
                bad.append(f"{key}: expected shape {expected_shape}, got {shape}")
            elif dtype not in HF_FLOAT_DTYPES:
                bad.append(f"{key}: expected a floating-point dtype, got {dtype}")
        if bad:
            raise ValueError(f"{self.root}: " + "; ".join(bad))

    def read(self, e: WeightEntry, spec: ShardSpec, head_dim: int) -> Tensor:
        """This rank's blocks of ``e`` (``spec``), a new tensor in the stored dtype that maps nothing of the file.

        Stacked experts are read expert by expert, each with ``spec`` less its expert dimension."""
        if e.experts:
            if spec.dim == 0:
                raise ValueError(f"{e.name}: expected a split of each expert, not of the experts, got {spec}")
            one = (
                ShardSpec.replicated(spec.shape[1:])
                if spec.dim is None
                else ShardSpec.split(spec.shape[1:], spec.dim - 1, spec.rank, spec.world, spec.parts)
            )
            return torch.stack([self.files.read(e.hf.format(e=k), one) for k in range(e.experts)])
        x = self.files.read(e.hf, spec)
        return hf_to_meta_rows(x, head_dim) if e.heads is not None else x
