"""Checks a site's training reply must pass before the server aggregates it.

A reply whose parameters are not finite, do not match the global model's names,
shapes or dtypes, or moved further from the global parameters than a bound is
rejected with a reason; one bad site must not spoil the federation's model. The
aggregation weights of the replies that pass are bounded relative to each other
(:func:`bound_weights`), so that no single site can make the global model its own
by claiming a huge weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UpdateCheck:
    """The verdict on one update: a reason to reject it, else its norm."""

    reason: str | None
    norm: float = math.nan


def check_update(update: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                 max_update_norm: float) -> UpdateCheck:
    """Whether a training reply's parameters may be aggregated, and if so how far they moved.

    Parameters
    ----------
    update : mapping of str to ndarray
        The parameters the site sent back.
    current : mapping of str to ndarray
        The global parameters the site was sent.
    max_update_norm : float
        Bound on the L2 norm of ``update - current`` over all parameters;
        0 turns the bound off.
    """
    missing = sorted(set(current) - set(update))
    extra = sorted(set(update) - set(current))
    if missing or extra:
        return UpdateCheck(f"parameter names differ from the global model's (missing: "
                           f"{missing[:3]}, unexpected: {extra[:3]})")
    squared = 0.0
    for name, ref in current.items():
        value = update[name]
        if value.shape != ref.shape:
            return UpdateCheck(f"{name} has shape {value.shape}, the global model's is "
                               f"{ref.shape}")
        if value.dtype != ref.dtype:
            return UpdateCheck(f"{name} has dtype {value.dtype}, the global model's is "
                               f"{ref.dtype}")
        if not np.all(np.isfinite(value)):
            return UpdateCheck(f"{name} holds NaN or infinite values")
        squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if not math.isfinite(norm):
        return UpdateCheck("the update's norm overflows")
    if max_update_norm > 0 and norm > max_update_norm:
        return UpdateCheck(f"update norm {norm:.4g} exceeds max-update-norm "
                           f"{max_update_norm:g}", norm)
    return UpdateCheck(None, norm)


def check_weight(weight: float) -> str | None:
    """A reason to reject an aggregation weight, else None (it must be finite and > 0)."""
    if not math.isfinite(weight) or weight <= 0:
        return f"aggregation weight {weight!r} is not a positive finite number"
    return None


def bound_weights(weights: Sequence[float], max_ratio: float) -> np.ndarray:
    """The aggregation weights, each clipped to ``max_ratio`` times their lower median.

    Computed in float64. The lower median (the middle weight, the smaller of the
    two middle ones for an even count) is used so that in a round of two sites
    the larger weight is bounded by the smaller one: one site can raise the
    median only where it is half of the round. A site's share of the aggregate is
    then at most ``max_ratio * m / (max_ratio * m + rest)``, where ``rest`` is the
    other sites' total weight.
    """
    values = np.asarray(weights, dtype=np.float64)
    if values.size == 0:
        return values
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError("aggregation weights must be positive and finite")
    median = float(np.sort(values)[(values.size - 1) // 2])
    return np.minimum(values, max_ratio * median)
