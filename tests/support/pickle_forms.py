"""Write the DCP index (``.metadata``) that a given Python would pickle, without torch.

DCP's ``.metadata`` is a pickle of torch's metadata dataclasses; how some of its objects are pickled
depends on the Python that writes it, not on torch: an ``Enum`` member (by value, or by name through
``builtins.getattr`` in Python 3.11.0 to 3.11.x), a ``pathlib`` path (``pathlib._local`` from 3.13),
the dataclasses themselves. torch 2.13's CPU wheel exists here for one Python only, so this script
stands in torch's names with stubs that pickle as torch's objects do (same module and class names,
same fields, same ``__reduce__`` / ``__getstate__``) and pickles a small index with the running
Python's defaults, as ``FileSystemWriter`` does (``pickle.dump(metadata, f)``).

    python tests/support/pickle_forms.py OUT.pickle      # with each Python to compare: 3.10 ... 3.13

tests/train/test_checkpoint_security.py reads the files this wrote under each Python (tests/data/pickle_forms)
with the restricted unpickler, and checks that the stubs' fields are torch's.
"""

from __future__ import annotations

import copyreg
import dataclasses
import enum
import os
import pathlib
import pickle
import sys
import types
from typing import Any

# torch 2.13's dataclasses in the index, by module, with their fields in order.
FIELDS: dict[str, dict[str, list[str]]] = {
    "torch.distributed.checkpoint.metadata": {
        "ChunkStorageMetadata": ["offsets", "sizes"],
        "TensorProperties": ["dtype", "layout", "requires_grad", "memory_format", "pin_memory"],
        "TensorStorageMetadata": ["properties", "size", "chunks"],
        "StorageMeta": ["checkpoint_id", "save_id", "load_id", "modules"],
        "Metadata": ["state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"],
        "MetadataIndex": ["fqn", "offset", "index"],
    },
    "torch.distributed.checkpoint.filesystem": {
        "_StorageInfo": ["relative_path", "offset", "length", "transform_descriptors"],
    },
}
MEM_FORMATS = {"TORCH_CONTIGUOUS_FORMAT": 0, "TORCH_CHANNELS_LAST": 1, "TORCH_PRESERVE_FORMAT": 2}
CHECKPOINT_ID = "/ckpt/step_00000002"


def _module(name: str) -> types.ModuleType:
    mod = sys.modules.setdefault(name, types.ModuleType(name))
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(_module(parent), child, mod)
    return mod


def _install_stubs() -> types.SimpleNamespace:
    torch = _module("torch")

    class Size(tuple):
        def __reduce__(self) -> Any:
            return (Size, (tuple(self),))

    class _Named:  # a dtype or memory format: pickled as the global torch.<name>
        def __init__(self, name: str) -> None:
            self.name = name

        def __reduce__(self) -> str:
            return self.name

    def _get_layout(name: str) -> Any:
        return torch.strided

    Size.__module__, Size.__qualname__ = "torch", "Size"
    _Named.__module__ = "torch"
    torch.Size = Size
    for name in ("float32", "bfloat16", "int64", "contiguous_format"):
        setattr(torch, name, _Named(name))
    serialization = _module("torch.serialization")
    _get_layout.__module__, _get_layout.__qualname__ = "torch.serialization", "_get_layout"
    serialization._get_layout = _get_layout
    torch.strided = type("layout", (), {"__module__": "torch", "__qualname__": "layout"})()
    copyreg.pickle(type(torch.strided), lambda _: (_get_layout, ("torch.strided",)))

    md = _module("torch.distributed.checkpoint.metadata")
    md._MEM_FORMAT_ENCODING = enum.Enum("_MEM_FORMAT_ENCODING", MEM_FORMATS, module=md.__name__)
    classes: dict[str, type] = {}
    for module, table in FIELDS.items():
        for cls_name, fields in table.items():
            kwargs = {"frozen": True, "init": False} if cls_name == "MetadataIndex" else {}
            cls = dataclasses.make_dataclass(cls_name, fields, **kwargs)
            cls.__module__, cls.__qualname__ = module, cls_name
            setattr(_module(module), cls_name, cls)
            classes[cls_name] = cls

    def index_init(self: Any, fqn: str, offset: Any = None, index: Any = None) -> None:
        # torch's own __init__ sets the fields in this order, so the pickled state lists them so
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "offset", offset)

    classes["MetadataIndex"].__init__ = index_init

    def getstate(self: Any) -> tuple:  # TensorProperties pickles its memory format as the enum
        return (self.dtype, self.layout, self.requires_grad, md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT, self.pin_memory)

    classes["TensorProperties"].__getstate__ = getstate
    return types.SimpleNamespace(torch=torch, **classes)


def index(ns: types.SimpleNamespace) -> Any:
    """The index of two tensors: ``w [4, 3]`` float32 in two chunks, ``step []`` int64 (see
    :func:`expected` in the test for the same index built with torch)."""
    t = ns.torch
    entries, records = {}, {}
    offset = 0
    for fqn, dtype, size, chunks in (
        ("w", t.float32, (4, 3), [((0, 0), (2, 3)), ((2, 0), (2, 3))]),
        ("step", t.int64, (), [((), ())]),
    ):
        props = ns.TensorProperties(dtype, t.strided, False, t.contiguous_format, False)
        metas = [ns.ChunkStorageMetadata(t.Size(o), t.Size(s)) for o, s in chunks]
        entries[fqn] = ns.TensorStorageMetadata(props, t.Size(size), metas)
        for o, _ in chunks:
            records[ns.MetadataIndex(fqn, t.Size(o), None)] = ns._StorageInfo("__0_0.distcp", offset, 1000, [])
            offset += 1000
    storage = ns.StorageMeta(pathlib.PosixPath(CHECKPOINT_ID), "save-id", None, [])
    return ns.Metadata(entries, None, records, storage, "1.0.0")


def main(out: str) -> None:
    data = pickle.dumps(index(_install_stubs()))
    with open(out, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    if len(sys.argv) != 2 or os.path.isdir(sys.argv[1]):
        sys.exit("usage: python tests/support/pickle_forms.py OUT.pickle")
    main(sys.argv[1])
