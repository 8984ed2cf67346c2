"""The torch releases pyproject.toml and the README declare are the ones the code needs.

Static (always runs, no download): every torch name the code reaches (``torch_api.scan``) is in the
recorded table of first releases (``torch_api_versions.txt``), and the declared minimum of the
package and of the training extra is the newest release any of its names needs. The table's
names are checked against the installed torch at run time.

Dynamic (opt-in, downloads torch): ``TP_FFN_MIN_TORCH_INDEX=https://download.pytorch.org/whl/cpu``
installs each declared minimum into a fresh venv and runs the package / a training step on it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from support.torch_api import ROOT, load_table, scan, scan_source

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

TABLE = load_table()
# The training job and its commands (python -m tp_ffn.{train,sample,convert}) need the train extra's torch.
COMMANDS = [ROOT / "tp_ffn" / "sample.py", ROOT / "tp_ffn" / "convert.py"]
CORE = sorted(
    p
    for p in (ROOT / "tp_ffn").rglob("*.py")
    if "train" not in p.relative_to(ROOT / "tp_ffn").parts and p not in COMMANDS
)
TRAIN = [ROOT / "tp_ffn" / "train", *COMMANDS, ROOT / "scripts", ROOT / "benchmarks"]


def _declared() -> tuple[tuple[int, int], tuple[int, int]]:
    """(torch minimum of the package, torch minimum of its `train` extra) from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def minimum(reqs: list[str], default: tuple[int, int] | None = None) -> tuple[int, int]:
        specs = [r.replace(" ", "") for r in reqs if re.match(r"torch\b", r)]
        if not specs and default:
            return default
        (spec,) = specs
        major, minor = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec).groups()
        return int(major), int(minor)

    core = minimum(project["dependencies"])
    return core, minimum(project["optional-dependencies"]["train"], default=core)


def _needed(names) -> tuple[tuple[int, int], list[str]]:
    """The newest first release among ``names``, and the names that need it."""
    newest = max(TABLE[n] for n in names)
    return newest, sorted(n for n in names if TABLE[n] == newest)


def test_scan_sees_imports_aliases_attributes_keywords_and_arity():
    src = (
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed.fsdp import fully_shard as fs\n"
        "_ops = torch.ops._c10d_functional\n"
        "def f(x, m):\n"
        "    dist.all_reduce(x, group=None)\n    fs(m, mesh=None)\n    _ops.wait_tensor(x)\n"
        "    return torch.compiler.is_compiling() and x.movedim(0, 1)\n"
    )
    used = scan_source(src)
    assert {
        "torch.distributed",
        "torch.distributed.all_reduce",
        "torch.distributed.all_reduce(group=)",
        "torch.distributed.all_reduce(*1)",
        "torch.distributed.fsdp.fully_shard",
        "torch.distributed.fsdp.fully_shard(mesh=)",
        "torch.ops._c10d_functional.wait_tensor(*1)",
        "torch.compiler.is_compiling(*0)",
    } <= used
    assert not any("movedim" in n for n in used)  # methods of objects are not seen (docs/testing.md says so)


def test_every_torch_name_the_code_uses_is_recorded():
    used = scan([ROOT / "tp_ffn", *TRAIN])
    missing = sorted(set(used) - set(TABLE))
    assert not missing, (
        f"torch names used but not in tests/support/torch_api_versions.txt: {missing} (in "
        f"{sorted({f for n in missing for f in used[n]})}); regenerate it with tests/support/torch_api.py"
    )


def test_declared_minimum_is_the_newest_release_the_code_needs():
    core_min, train_min = _declared()
    core_used = set(scan(CORE))
    train_used = core_used | set(scan(TRAIN))
    core_needs, core_names = _needed(core_used)
    train_needs, train_names = _needed(train_used)
    assert core_needs == core_min, f"the package needs torch {core_needs} ({core_names}); pyproject says {core_min}"
    assert train_needs == train_min, (
        f"the training job needs torch {train_needs} ({train_names}); [train] says {train_min}"
    )
    # Negative control: a name the minimum lacks would be caught (the check is not vacuous).
    planted = scan_source("from torch.distributed.fsdp import fully_shard\nfully_shard(None, mp_policy=None)\n")
    assert _needed(core_used | planted)[0] > core_min


def test_readme_states_the_declared_minimums():
    core_min, train_min = _declared()
    readme = (ROOT / "README.md").read_text()
    for v in (core_min, train_min):
        assert f"torch >= {v[0]}.{v[1]}" in readme, f"README does not state torch >= {v[0]}.{v[1]}"


def _runtime_object(name: str):
    """The object ``name`` (without a call suffix) denotes in the installed torch."""
    parts = name.split(".")
    obj, i = importlib.import_module("torch"), 1
    while i < len(parts):
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ModuleNotFoundError:
            obj = getattr(obj, parts[i])
        i += 1
    return obj


def test_recorded_names_exist_in_the_installed_torch():
    """Every table entry is a real name (no typo in the table): it exists in this torch, and its
    keywords are in its signature where Python can read one."""
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert max(TABLE.values()) <= installed
    for name in TABLE:
        base, _, call = name.partition("(")
        if "ProcessGroupNCCL" in base and not torch.distributed.is_nccl_available():
            continue  # a CPU build has no NCCL; the code asks for it only on CUDA
        obj = _runtime_object(base)
        if call.endswith("=)"):
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue  # a C function without a signature
            kw = call[:-2]
            assert kw in params or any(p.kind is p.VAR_KEYWORD for p in params.values()), name


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TP_FFN_MIN_TORCH_INDEX"),
    reason="set TP_FFN_MIN_TORCH_INDEX to a torch wheel index (e.g. https://download.pytorch.org/whl/cpu) "
    "to install the declared minimum torch releases (hundreds of MB each)",
)
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("part", ["package", "train"])
def test_declared_minimum_installs_and_runs(tmp_path, part):
    core_min, train_min = _declared()
    version = "{}.{}.*".format(*(core_min if part == "package" else train_min))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={version}", "--index-url", os.environ["TP_FFN_MIN_TORCH_INDEX"]], check=True)
    extras = "" if part == "package" else "[train]"
    subprocess.run([*pip, f"{ROOT}{extras}"], check=True)  # torch is satisfied: nothing newer comes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if part == "package":
        code = (
            "import torch, tp_ffn, tp_ffn.models\n"
            "torch.manual_seed(0)\n"
            "ffn = tp_ffn.ParallelFeedForward(16, 40, bias=True)\n"
            "x = torch.randn(2, 3, 16, requires_grad=True)\n"
            "ffn(x).sum().backward()\n"
            "m = tp_ffn.models.Transformer(tp_ffn.models.PRESETS['tiny'])\n"
            "print(torch.__version__, m(torch.zeros(1, 8, dtype=torch.long)).shape)\n"
        )
        r = subprocess.run(
            [py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    else:
        args = ["--preset", "tiny", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress"]
        args += ["--ckpt-dir", str(tmp_path / "run"), "--val-every", "1", "--val-sequences", "2"]
        r = subprocess.run(
            [py, str(ROOT / "scripts" / "train.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    installed = subprocess.run(
        [py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=False
    )
    assert installed.stdout.startswith(version[:-1]), installed.stdout
