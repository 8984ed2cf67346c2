"""Run ``benchmarks/<name>`` for the wrapper ``scripts/<name>`` that imports this: the benchmarks and
measurement tools moved there, and the old paths keep working for the commands that name them.

The tool runs as ``__main__`` with the wrapper's command line (``sys.argv`` untouched, so under
torchrun each rank runs it too), and exits as the tool does.
"""

from __future__ import annotations

import runpy
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(wrapper: str) -> None:
    """Run the tool of the same file name as ``wrapper`` (the wrapper's ``__file__``)."""
    runpy.run_path(str(BENCHMARKS / Path(wrapper).name), run_name="__main__")
