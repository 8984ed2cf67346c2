"""tp_ffn's imports point one way: no cycle between its modules, and every layer imports only those below it.

Every module of the package is parsed with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` at any nesting level counts (one deferred into a function, or under
``TYPE_CHECKING``, is still a dependency), relative ones resolved against the module's package, and
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.

The layers (a module may import its own layer and those it lists)::

    core       tp_ffn/__init__, groups, comm, init, layers, ffn, swiglu, swiglu_kernels, fused, emulation, sharding,
               checkpoint (the FFN state-dict names ffn reads), moe, grouped, lowrank, grad_norm: torch and
               the standard library only
    support    files, safetensors_dir, diagnostics, machine, shutdown              <- core
    models     tp_ffn.models.*                                                      <- core, support
    hf         tp_ffn.hf.*  (adapter)                                               <- core, support
    fairscale  tp_ffn.fairscale.*  (adapter)                                        <- core, support
    train      tp_ffn.train.*  (inside it: tests/train/test_package_layout.py)            <- core, support, models
    commands   tp_ffn.sample, tp_ffn.convert                                        <- core, support, models, train

A module in none of these (a new top-level module or subpackage) is held to the no-cycle rule only,
and no layer may import it until it is placed here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "tp_ffn"

CORE = {"", "groups", "comm", "init", "layers", "ffn", "swiglu", "swiglu_kernels", "fused", "emulation", "sharding", "checkpoint", "moe", "grouped", "lowrank", "grad_norm"}
SUPPORT = {"files", "safetensors_dir", "diagnostics", "machine", "shutdown"}
SUBPACKAGES = {"models", "hf", "peft", "fairscale", "train"}
COMMANDS = {"sample", "convert"}  # python -m tp_ffn.<name>; tp_ffn.train's command is its own __main__
ALLOWED = {
    "core": {"core"},
    "support": {"core", "support"},
    "models": {"core", "support", "models"},
    "hf": {"core", "support", "hf", "peft"},  # parallelize_mlp teaches PEFT where it is installed
    "peft": {"core", "support", "peft"},
    "fairscale": {"core", "support", "fairscale"},
    "train": {"core", "support", "models", "train"},
    "commands": {"core", "support", "models", "train", "commands"},
}
CORE_THIRD_PARTY = {"torch", "__future__"}


def modules(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under the package directory ``root`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """``(package modules it imports, top-level names of other packages it imports)``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.split(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if len(base) < 1 or not base[0]:
                    raise ValueError(f"{path}: relative import beyond the package")
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == root:
                # `import tp_ffn.models.llama` needs that module; an unknown tail is a name in a known one.
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                inside.add(target)
            else:
                outside.add(target.split(".")[0])
    return inside, outside


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules(root)
    known = set(found)
    edges, third_party = {}, {}
    for name, path in found.items():
        edges[name], third_party[name] = imports(name, path, known)
    return edges, third_party


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def layer(name: str) -> str | None:
    parts = name.split(".")[1:]
    if not parts or (len(parts) == 1 and parts[0] in CORE):
        return "core"
    if len(parts) == 1 and parts[0] in SUPPORT:
        return "support"
    if len(parts) == 1 and parts[0] in COMMANDS:
        return "commands"
    if parts[0] in SUBPACKAGES:
        return parts[0]
    return None


def layer_violations(edges: dict[str, set[str]], third_party: dict[str, set[str]]) -> list[str]:
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, targets in sorted(edges.items()):
        own = layer(name)
        if own is None:
            continue
        for target in sorted(targets):
            if layer(target) not in ALLOWED[own]:
                bad.append(f"{name} ({own}) imports {target} ({layer(target) or 'unplaced'})")
        if own == "core":
            for pkg in sorted(third_party[name] - stdlib - CORE_THIRD_PARTY):
                bad.append(f"{name} (core) imports {pkg}: the core needs torch only")
    return bad


def test_no_import_cycles():
    edges, _ = graph(ROOT)
    assert len(edges) > 40  # the whole package was read
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_layers_import_downwards():
    edges, third_party = graph(ROOT)
    assert {layer(n) for n in edges} >= set(ALLOWED)  # every layer is present
    bad = layer_violations(edges, third_party)
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------------
# Negative controls: the checks see a planted cycle (deferred and relative imports included) and a
# core module reaching up, in a package written for the purpose.


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "tp_ffn"
    for rel, text in {"__init__.py": "", "models/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_planted_deferred_cycle_is_found(tmp_path):
    root = _package(tmp_path, {
        "models/llama.py": "from .config import Cfg\n",
        "models/config.py": "class Cfg:\n    def load(self):\n        from ..models import loading\n",
        "models/loading.py": "import tp_ffn.models.llama as llama\n",
    })  # fmt: skip
    edges, _ = graph(root)
    assert edges["tp_ffn.models.config"] == {"tp_ffn.models.loading"}
    assert find_cycle(edges) == ["tp_ffn.models.config", "tp_ffn.models.loading", "tp_ffn.models.llama",
                                 "tp_ffn.models.config"]  # fmt: skip
    (root / "models/config.py").write_text("class Cfg:\n    pass\n")
    assert find_cycle(graph(root)[0]) is None


def test_a_core_module_reaching_up_is_found(tmp_path):
    root = _package(tmp_path, {
        "layers.py": "import numpy\n\ndef f():\n    from .models import llama\n",
        "models/llama.py": "from ..layers import f\n",
    })  # fmt: skip
    edges, third_party = graph(root)
    assert find_cycle(edges) == ["tp_ffn.layers", "tp_ffn.models.llama", "tp_ffn.layers"]
    assert layer_violations(edges, third_party) == [
        "tp_ffn.layers (core) imports tp_ffn.models.llama (models)",
        "tp_ffn.layers (core) imports numpy: the core needs torch only",
    ]


@pytest.mark.parametrize("module", sorted((CORE - {""}) | SUPPORT | COMMANDS))
def test_core_list_names_modules(module):
    """A name in CORE, SUPPORT or COMMANDS that is not a module would make the rule vacuous for it."""
    assert (ROOT / f"{module}.py").is_file()
