"""Helpers shared by the tests: relative errors and the float64 dense reference."""

from __future__ import annotations

from torch import Tensor

from tp_ffn import FeedForward


def rel_err(got: Tensor, want: Tensor) -> float:
    """Frobenius-norm relative error ``||got - want|| / ||want||`` in float64."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def dense64(dense: FeedForward) -> FeedForward:
    """A float64 copy of ``dense`` (the reference every parallel path is held against)."""
    return FeedForward.from_state_dict(
        {k: v.double() for k, v in dense.state_dict().items()}, activation=dense.activation
    )


def worst(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The largest value of each metric over the ranks."""
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}
