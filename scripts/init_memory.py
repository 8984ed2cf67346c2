"""Moved to ``benchmarks/init_memory.py``; this path runs it, with the same arguments."""

import _moved

_moved.run(__file__)
