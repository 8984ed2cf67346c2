"""The three commands as modules, console scripts and script wrappers, on one runner.

``python -m tp_ffn.{train,sample,convert}``, the console scripts ``tp-ffn-{train,sample,convert}``
that pyproject.toml declares, and ``scripts/{train,sample,convert_checkpoint}.py`` are one command
each: ``--help`` works everywhere, bad input is one line ``<prog>: error: ...`` with exit status 2
whichever way it is started, and ``torchrun -m tp_ffn.train`` trains on 2 ranks. One argparse class
raises the errors (tp_ffn/train/cli.py), and no other module subclasses argparse's parser.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tp_ffn.train.cli import ArgumentParser, run_cli
from tp_ffn.train.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"train": "tp_ffn.train", "sample": "tp_ffn.sample", "convert": "tp_ffn.convert"}
WRAPPERS = {"train": "train.py", "sample": "sample.py", "convert": "convert_checkpoint.py"}
# One bad argument each command refuses before it loads anything.
BAD = {
    "train": (["--tp", "0"], "--tp: expected an int >= 1, got 0"),
    "sample": (["--ckpt-dir", "x", "--num-samples", "0"], "--max-new-tokens must be >= 0 and --num-samples >= 1"),
    "convert": (["--from", "x"], "argument --from: invalid choice: 'x'"),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _console_script(name: str) -> str:
    """The installed console script ``tp-ffn-<name>`` beside this interpreter."""
    try:
        dist = metadata.distribution("tp-ffn")
    except metadata.PackageNotFoundError:
        pytest.skip("tp-ffn is not installed (pip install -e .): no console scripts to run")
    assert f"tp-ffn-{name}" in {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}, (
        "the installed tp-ffn predates [project.scripts]: pip install -e . again"
    )
    path = Path(sys.executable).parent / f"tp-ffn-{name}"
    assert path.is_file(), path
    return str(path)


def _entry(how: str, name: str) -> tuple[list[str], str]:
    """``(command line, prog)`` of command ``name`` started as ``how``."""
    if how == "module":
        return [sys.executable, "-m", COMMANDS[name]], f"python -m {COMMANDS[name]}"
    if how == "console":
        return [_console_script(name)], f"tp-ffn-{name}"
    return [sys.executable, f"scripts/{WRAPPERS[name]}"], WRAPPERS[name]


def test_pyproject_declares_the_console_scripts():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # train's console script ends the process as python -m does (exit_with: status 75 survives a late SIGTERM)
    expected = {f"tp-ffn-{n}": f"{m}:main" for n, m in COMMANDS.items()}
    expected["tp-ffn-train"] = "tp_ffn.train.__main__:console"
    assert scripts == expected
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["module", "console", "wrapper"])
def test_help_and_bad_arguments_every_way(how):
    """``--help`` exits 0 naming the command as it was started; a bad argument is one line
    ``<prog>: error: <message>`` and exit status 2, the same message every way."""
    for name in COMMANDS:
        cmd, prog = _entry(how, name)
        r = _run([*cmd, "--help"])
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {prog} "), (name, r.stdout[:300], r.stderr[-2000:])
        args, message = BAD[name]
        r = _run([*cmd, *args])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr[-2000:])
        assert lines[0].startswith(f"{prog}: error: {message}"), (name, lines)


def test_run_cli_exit_statuses(capsys, monkeypatch):
    """The runner's table: 0, the command's own status, 2 (one line) for a UsageError and for
    argparse's own errors, 1 for a diverged loss, 130 for Ctrl-C."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def raising(error: BaseException):
        def command(prog: str) -> None:
            raise error

        return command

    assert run_cli("x", lambda prog: None) == 0
    assert run_cli("x", lambda prog: 3) == 3
    assert run_cli("x", raising(UsageError("--flag: bad"))) == 2
    assert capsys.readouterr().err == "x: error: --flag: bad\n"
    assert run_cli("x", lambda prog: ArgumentParser(prog=prog).parse_args(["--nope"])) == 2
    assert capsys.readouterr().err == "x: error: unrecognized arguments: --nope\n"
    assert run_cli("x", raising(FloatingPointError("loss is nan at step 3"))) == 1
    assert capsys.readouterr().err == "x: error: loss is nan at step 3\n"
    assert run_cli("x", raising(KeyboardInterrupt())) == 130
    with pytest.raises(RuntimeError):  # a bug is not bad input: its traceback stays
        run_cli("x", raising(RuntimeError("bug")))


def test_one_argument_parser_class():
    """The argparse subclass that raises UsageError exists once: no other module of the package,
    the scripts or the benchmarks defines its own."""
    own = ROOT / "tp_ffn" / "train" / "cli.py"
    found = []
    for folder in ("tp_ffn", "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and any("ArgumentParser" in ast.unparse(b) for b in node.bases):
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert found == [f"{own.relative_to(ROOT)}:ArgumentParser"], found


# Tools written in benchmarks/ after the move have no old path to keep.
NEW_IN_BENCHMARKS = {"bench_phases.py"}
MOVED = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in NEW_IN_BENCHMARKS)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_old_script_paths_run_the_moved_tools():
    """``scripts/<tool>.py`` for every tool moved to benchmarks/: the same program, named as before
    (``--help`` exits 0 with its usage), and the wrapper is all that is left at the old path."""
    assert len(MOVED) == 15 and "bench.py" in MOVED and "parity.py" in MOVED
    for name in MOVED:
        assert len((ROOT / "scripts" / name).read_text().splitlines()) < 8, name  # a wrapper, nothing more
        r = _run([sys.executable, f"scripts/{name}", "--help"])
        assert r.returncode == 0 and r.stdout.startswith("usage: "), (name, r.stdout[:300], r.stderr[-2000:])
        assert r.stdout.split()[1] == name, (name, r.stdout[:100])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_m_tp_ffn_train_on_two_ranks(tmp_path):
    """``torchrun -m tp_ffn.train``: 2 steps of the tiny model at tp 2 on 2 gloo ranks, a checkpoint
    and the metrics written; then ``python -m tp_ffn.sample`` reads that checkpoint."""
    ckpt, metrics = tmp_path / "ck", tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tp_ffn.train"]
    cmd += ["--preset", "tiny", "--model-args", "n_layers=1", "--tp", "2", "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--corpus-bytes", "20000", "--val-every", "0", "--no-progress",
            "--ckpt-dir", str(ckpt), "--metrics", str(metrics)]  # fmt: skip
    r = _run(cmd, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (ckpt / "step_00000002" / "meta.json").is_file()
    meta = json.loads((ckpt / "step_00000002" / "meta.json").read_text())
    assert (meta["tp"], meta["dp"]) == (2, 1)
    steps = [rec["step"] for rec in map(json.loads, metrics.read_text().splitlines()) if "loss" in rec]
    assert steps[-1] == 2, steps
    r = _run([sys.executable, "-m", "tp_ffn.sample", "--ckpt-dir", str(ckpt), "--max-new-tokens", "4"])
    assert r.returncode == 0 and "--- sample 1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
