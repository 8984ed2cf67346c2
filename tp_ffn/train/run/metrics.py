"""Metrics on rank 0: a JSONL file (one object per line), a progress bar, and the loss plot.

Lines of the metrics file::

    {"step": 12, "loss": 2.91, "lr": 0.0029, "tokens": 24576, "tokens_per_s": 8123.4, "grad_norm": 0.83, "time_s": 0.126}
    {"step": 50, "val_loss": 2.74, "val_ppl": 15.49}

``step`` counts optimizer steps done (the first training line is step 1; ``--eval-only`` of
pretrained weights writes step 0); ``tokens`` counts the tokens trained on so far; ``val_loss``
is the mean cross-entropy per token (nats) and ``val_ppl`` its exponential. A resumed run first
drops the lines past the checkpoint's step (they belong to the interrupted attempt), so the file
reads as one uninterrupted run; a fresh run keeps only the step-0 evaluations.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLog", "Progress", "plot_metrics", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path`` with an int ``step`` (a torn last line, from a
    crash, and anything else a hand-edited file holds are skipped)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


class MetricsLog:
    """Appends JSON lines to ``path`` (flushed per line). Inactive when ``path`` is ``None``.

    Lines with ``step > resume_step`` are dropped first (written to a temporary file and renamed
    over, so a crash leaves either file); ``resume_step=None`` is a fresh run, which keeps only
    step-0 lines (evaluations of the weights it starts from). ``append=True`` keeps every line.
    A write that fails (a full disk) is kept in :attr:`error` and ends the writing: the trainer
    stops every rank on it (one line), instead of this rank alone raising mid-run.
    """

    def __init__(self, path: str | os.PathLike | None, *, resume_step: int | None = None, append: bool = False) -> None:
        self.path = None if path is None else Path(path)
        self._f: TextIO | None = None
        self.error: OSError | None = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            self._f = open(self.path, "a")
        elif self.path.exists():
            last = 0 if resume_step is None else resume_step
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= last]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
            self._f = open(self.path, "a")
        else:
            self._f = open(self.path, "w")

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None and self.error is None:
            try:
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()
            except OSError as e:
                self.error = e

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:  # the buffered rest could not be written either
                self.error = self.error or e
            self._f = None


class Progress:
    """A tqdm bar (step, loss, tokens/s, ETA) on rank 0; nothing elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train"
            )

    def update(self, loss: float, tokens_per_s: float, val_loss: float | None = None) -> None:
        if self._bar is not None:
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if val_loss is not None:
                post["val"] = f"{val_loss:.4f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_metrics(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Plot train and validation loss against step from a metrics file; returns the PNG's path
    (default: the metrics file with ``.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    png = Path(out) if out is not None else Path(path).with_suffix(".png")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{Path(path).parent.name}/{Path(path).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
