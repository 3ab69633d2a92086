"""Split a labelled pool across sites with a chosen class distribution per site."""

from __future__ import annotations

import numpy as np


def max_site_size(class_counts: np.ndarray, class_probs: np.ndarray) -> int:
    """Largest ``n`` such that every site can draw ``n`` examples with its class mix.

    Parameters
    ----------
    class_counts : np.ndarray
        (C,) examples available per class.
    class_probs : np.ndarray
        (S, C) class distribution wanted at each site (rows sum to 1).
    """
    demand = class_probs.sum(axis=0)
    limits = [class_counts[c] / demand[c] for c in range(len(demand)) if demand[c] > 0]
    return int(np.floor(min(limits)))


def partition_by_class_probs(
    labels: np.ndarray, class_probs: np.ndarray, rng: np.random.Generator,
    size: int | None = None,
) -> list[np.ndarray]:
    """Indices for each site: ``size`` examples whose class mix follows ``class_probs``.

    Sites get disjoint examples. Per class, site ``s`` receives
    ``round(size * class_probs[s, c])`` examples (rounding keeps each site at ``size``).

    Raises
    ------
    ValueError
        When the pool lacks the examples the requested mix needs.
    """
    class_probs = np.asarray(class_probs, dtype=float)
    if class_probs.ndim != 2 or np.any(class_probs < 0) or not np.allclose(
        class_probs.sum(axis=1), 1.0
    ):
        raise ValueError("class_probs must be a (sites, classes) matrix of rows summing to 1")
    num_classes = class_probs.shape[1]
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    # Rounding can give a site one extra example of a class; keep that headroom.
    largest = max_site_size(np.maximum(counts - len(class_probs), 0), class_probs)
    size = largest if size is None else size
    if size < 1 or size > largest:
        raise ValueError(
            f"cannot give every site {size} examples with the requested class mix; "
            f"at most {largest} fit in this pool"
        )
    per_site = np.floor(size * class_probs).astype(int)
    for row, probs in zip(per_site, class_probs, strict=True):
        shortfall = size - row.sum()
        order = np.argsort(-(size * probs - np.floor(size * probs)))
        row[order[:shortfall]] += 1
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    offsets = np.zeros(num_classes, dtype=int)
    sites = []
    for row in per_site:
        picked = [pools[c][offsets[c]:offsets[c] + row[c]] for c in range(num_classes)]
        offsets += row
        sites.append(rng.permutation(np.concatenate(picked)))
    return sites


def binary_class_probs(prevalences: list[float]) -> np.ndarray:
    """(S, 2) class distributions from each site's prevalence of class 1."""
    prev = np.asarray(prevalences, dtype=float)
    if np.any((prev < 0) | (prev > 1)):
        raise ValueError(f"prevalences must lie in [0, 1], got {prevalences}")
    return np.stack([1.0 - prev, prev], axis=1)
