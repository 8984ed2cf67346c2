"""Type aliases shared by the weight readers and writers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]
# A tqdm-like wrapper: ``progress(iterable, desc=...)``.
Progress = Callable[..., Iterable[Any]]
