"""Moved to ``benchmarks/bench_generate.py``; this path runs it, with the same arguments."""

import _moved

_moved.run(__file__)
