"""tp_ffn/train's subpackages import one way, and its package docstring lists every module.

The order (tp_ffn/train/__init__.py): ``run`` -> ``data`` -> ``checkpoint``, ``run`` -> ``budget``,
every subpackage -> the shared modules at the top (config, errors, consensus, cli), which import no
subpackage. Imports are read with ``ast`` (deferred ones included), nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "tp_ffn" / "train"
# What each part of tp_ffn.train may import ("top": the modules directly in tp_ffn/train/).
ALLOWED = {
    "top": {"top"},
    "budget": {"budget", "top"},
    "checkpoint": {"checkpoint", "top"},
    "data": {"data", "checkpoint", "top"},
    "run": {"run", "data", "checkpoint", "budget", "top"},
}
ENTRY = {"__init__.py", "__main__.py"}  # the package's public names and the command: may import anything


def _part(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "top"


def _targets(root: Path, path: Path) -> set[str]:
    """The parts of the package at ``root`` that the module ``path`` imports (relative or absolute)."""
    package = list(path.relative_to(root).parent.parts)  # relative to tp_ffn.train
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[list[str]] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 > len(package):
                continue  # above tp_ffn.train
            base = package[: len(package) - (node.level - 1)]
            names = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tp_ffn.train."):
            names = [node.module.split(".")[2:]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[2:] for a in node.names if a.name.startswith("tp_ffn.train.")]
        for parts in names:
            if parts:
                out.add(parts[0] if (root / parts[0]).is_dir() else "top")
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) == 1 and rel.name in ENTRY:
            continue
        own = _part(rel)
        for target in sorted(_targets(root, path) - ALLOWED[own]):
            bad.append(f"{rel} ({own}) imports {target}")
    return bad


def test_subpackages_import_one_way():
    assert {_part(p.relative_to(TRAIN)) for p in TRAIN.rglob("*.py")} == set(ALLOWED)
    assert violations(TRAIN) == []


def test_a_planted_upward_import_is_found(tmp_path):
    """Negative control: checkpoint importing data (deferred), a shared module importing run, and
    an absolute import; data importing checkpoint is allowed."""
    for rel, text in {
        "checkpoint/store.py": "def f():\n    from ..data.tokenizers import resolve\n",
        "errors.py": "from .run import trainer\n",
        "budget/flops.py": "import tp_ffn.train.run.trainer\n",
        "data/corpus.py": "from ..checkpoint.store import f\nfrom .. import errors\nfrom ...models import llama\n",
        "run/trainer.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert violations(tmp_path) == [
        "budget/flops.py (budget) imports run",
        "checkpoint/store.py (checkpoint) imports data",
        "errors.py (top) imports run",
    ]


def test_package_docstring_lists_every_module():
    import tp_ffn.train

    doc = tp_ffn.train.__doc__
    for path in sorted(TRAIN.rglob("*.py")):
        rel = path.relative_to(TRAIN)
        if rel.name == "__init__.py" or "tokenizers" in rel.parts:  # tokenizers/ has its own table
            continue
        assert f" {rel.name} " in doc, f"tp_ffn/train/__init__.py does not list {rel}"
