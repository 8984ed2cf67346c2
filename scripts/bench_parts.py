"""Moved to ``benchmarks/bench_parts.py``; this path runs it, with the same arguments."""

import _moved

_moved.run(__file__)
