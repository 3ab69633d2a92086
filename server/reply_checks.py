"""Checks a site's training reply must pass before the server aggregates it.

A reply whose parameters are not finite, do not match the global model's names,
shapes or dtypes, or moved further from the global parameters than a bound is
rejected with a reason; one bad site must not spoil the federation's model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UpdateCheck:
    """The verdict on one update: a reason to reject it, else its norm."""

    reason: str | None
    norm: float = math.nan


def check_update(update: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                 num_examples: object, max_update_norm: float) -> UpdateCheck:
    """Whether a training reply may be aggregated, and if so how far it moved.

    Parameters
    ----------
    update : mapping of str to ndarray
        The parameters the site sent back.
    current : mapping of str to ndarray
        The global parameters the site was sent.
    num_examples : object
        The example count the reply weights its parameters by.
    max_update_norm : float
        Bound on the L2 norm of ``update - current`` over all parameters;
        0 turns the bound off.
    """
    missing = sorted(set(current) - set(update))
    extra = sorted(set(update) - set(current))
    if missing or extra:
        return UpdateCheck(f"parameter names differ from the global model's (missing: "
                           f"{missing[:3]}, unexpected: {extra[:3]})")
    if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, float))
            or not math.isfinite(num_examples) or num_examples <= 0):
        return UpdateCheck(f"num-examples is {num_examples!r}, not a positive number")
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
    if max_update_norm > 0 and norm > max_update_norm:
        return UpdateCheck(f"update norm {norm:.4g} exceeds max-update-norm "
                           f"{max_update_norm:g}", norm)
    return UpdateCheck(None, norm)
