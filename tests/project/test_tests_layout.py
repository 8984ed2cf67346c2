"""The tests' own shape (docs/testing.md): one folder per layer of the package, shared code only in
tests/support/, no test importing another test file, and the `slow` marker registered for the fast tier."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

TESTS = Path(__file__).resolve().parents[1]
FOLDERS = {"core", "models", "train", "hf", "peft", "fairscale", "tools", "project"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def imports_of_test_files(root: Path) -> list[str]:
    """``file: module`` for every import of a ``test_*`` module under ``root``."""
    return [
        f"{p.relative_to(root)}: {m}"
        for p in sorted(root.rglob("*.py"))
        for m in sorted(_imported_modules(p))
        if m.startswith("test_")
    ]


def test_every_test_file_sits_in_a_layer_folder():
    loose = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not loose, f"test files outside the layer folders: {loose}"
    for p in TESTS.rglob("test_*.py"):
        assert p.parent.parent == TESTS and p.parent.name in FOLDERS, p.relative_to(TESTS)
    assert {p.name for p in TESTS.iterdir() if p.is_dir()} >= FOLDERS | {"support"}


def test_no_test_imports_another_test_file(tmp_path):
    assert imports_of_test_files(TESTS) == []
    # the check finds one when there is one
    (tmp_path / "test_a.py").write_text("from test_b import helper\n")
    (tmp_path / "test_c.py").write_text("import test_b as b\n")
    assert imports_of_test_files(tmp_path) == ["test_a.py: test_b", "test_c.py: test_b"]


def test_support_holds_no_tests():
    support = TESTS / "support"
    for p in support.glob("*.py"):
        tree = ast.parse(p.read_text())
        tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        assert not tests, f"{p.name}: {tests}"


def test_slow_marker_is_registered_and_used(pytestconfig):
    config = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
    markers = config["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers), markers
    marked = [p for p in TESTS.rglob("test_*.py") if "pytest.mark.slow" in p.read_text()]
    assert len(marked) > 10, marked


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_each_layer_folder_has_tests(folder):
    assert list((TESTS / folder).glob("test_*.py")), folder
