"""Moved to ``benchmarks/memory_check.py``; this path runs it, with the same arguments and exit status."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / Path(__file__).name), run_name="__main__")
