"""Run ``scripts/<name>``'s ``main(argv)`` inside a rank-pool process: its exit status and its one error line."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import runpy
import sys
from pathlib import Path

from support.rankpool import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def _script_main(rank: int, world: int, script: str, argv: list[str]) -> tuple[int, str]:
    main = runpy.run_path(str(ROOT / "scripts" / script))["main"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def script_error(script: str, argv: list[str], timeout: float = 120) -> str | None:
    """``None`` when ``script`` succeeds; else its error message, after checking that it exited with
    status 2 and wrote exactly one line to stderr, ``<script>: error: ...``."""
    rc, err = run_ranks(1, _script_main, script, argv, timeout=timeout)[0]
    if rc == 0:
        return None
    prefix = f"{script}: error: "
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(prefix), (rc, err)
    return lines[0][len(prefix) :]


def _load_script(name: str, folder: str = "scripts"):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (parity.py's) look their module up there
    spec.loader.exec_module(module)
    return module
