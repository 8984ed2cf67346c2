"""The training job in-process on a rank pool, as the equivalence tests run it: every rank must report the same
(all-reduced) numbers, and the test compares one rank's with another run's."""

from __future__ import annotations

from support.rankpool import run_ranks
from tp_ffn.train import TrainConfig, train


def _train(rank: int, world: int, config: dict) -> dict:
    res = train(TrainConfig(**config))
    return {"losses": res.losses, "aux": res.aux_losses, "val": res.val_losses, "start": res.start_step}


def run_training(world: int, base: dict, **overrides) -> dict:
    """``train(TrainConfig(**base, **overrides))`` on ``world`` ranks: losses, aux losses, validation losses and
    the first step, checked equal on every rank."""
    results = run_ranks(world, _train, {**base, **overrides}, timeout=240)
    for r in results[1:]:
        assert r == results[0]
    return results[0]
