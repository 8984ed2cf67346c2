"""In-process training runs that a signal stops (from inside a step or a save), as the preemption, async-save
and full-disk tests run them on a rank pool; and waiting for a launched run to reach a step."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from support.launch import _steps
from tp_ffn.train import TrainConfig, train

BASE = {
    "preset": "tiny", "steps": 12, "seq_len": 32, "batch_size": 8, "corpus_bytes": 200_000, "val_every": 5,
    "val_sequences": 8, "warmup_steps": 3, "seed": 0, "progress": False,
}  # fmt: skip


def _default_handlers() -> None:
    # A stopped run leaves its recording handlers installed (the process is meant to exit next);
    # the pool's worker processes live on for the next test.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def _summary(res) -> dict:
    return {
        "losses": res.losses, "start": res.start_step, "final": res.final_step,
        "stopped_by": getattr(res, "stopped_by", None),  # (getattr: the helper also runs against older code)
        "checkpoints": res.checkpoints,
    }  # fmt: skip


def _run(rank: int, world: int, overrides: dict) -> dict:
    try:
        return _summary(train(TrainConfig(**{**BASE, **overrides})))
    finally:
        _default_handlers()


def _signalled(rank: int, world: int, overrides: dict, at_step: int, who: int, signame: str) -> dict:
    """A run in which rank ``who`` sends itself ``signame`` during its ``at_step``-th training step."""
    from tp_ffn.train.run import trainer

    real = trainer._Trainer.train_step
    calls = {"n": 0}

    def step(self, position):
        calls["n"] += 1
        if calls["n"] == at_step and rank == who:
            os.kill(os.getpid(), getattr(signal, signame))
        return real(self, position)

    trainer._Trainer.train_step = step
    try:
        return _run(rank, world, overrides)
    finally:
        trainer._Trainer.train_step = real


def _signal_inside_save(rank: int, world: int, overrides: dict) -> dict:
    """Every rank sends itself SIGTERM, SIGUSR1 and SIGTERM again while digesting the first file of
    its first save (DCP has written it; the index, meta.json and the rename are still to come)."""
    from tp_ffn.train.checkpoint import saving

    real = saving.file_digest
    sent = {"done": False}

    def digest(path):
        if not sent["done"]:
            sent["done"] = True
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
        return real(path)

    saving.file_digest = digest
    try:
        return _run(rank, world, overrides)
    finally:
        saving.file_digest = real


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(_steps(metrics), default=0) < step:
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)
