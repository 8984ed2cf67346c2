"""Run ``scripts/<name>``'s ``main(argv)`` inside a rank-pool process: its exit status and its one error line."""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

from rankpool import run_ranks

ROOT = Path(__file__).resolve().parents[1]


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
