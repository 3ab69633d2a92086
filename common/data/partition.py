"""Split a labelled pool into disjoint parts, each with a chosen size and class mix.

The one partitioner of simulated data: :func:`partition_by_class_probs` gives every
site of a federation the same number of examples with its own class mix, and a
scenario (:mod:`simulations.scenario`) draws each site's train, val, test and pool
with :func:`class_counts` and :func:`draw_disjoint`.

Rounding: a part of ``size`` examples with class mix ``p`` gets, of class ``c``,
``floor(size * p[c])`` or one more, the extra examples going to the classes with
the largest remainders (ties: the higher class), so every part has exactly its
size. For two classes that is the class-1 count ``size * p[1]`` rounded half up.
"""

from __future__ import annotations

import numpy as np


class PoolTooSmall(ValueError):
    """The pool lacks examples of a class that the requested parts need."""

    def __init__(self, label: int, needed: int, available: int) -> None:
        super().__init__(f"the parts need {needed} examples of class {label} but the pool "
                         f"has {available}")
        self.label = label
        self.needed = needed
        self.available = available


def class_counts(size: int, class_probs: np.ndarray) -> np.ndarray:
    """(C,) examples per class of a part of ``size`` with class mix ``class_probs``.

    Each count is ``size * class_probs[c]`` rounded down or up; they sum to
    ``size`` (largest remainders round up, ties to the higher class: see the
    module docstring). Class 0 takes what the others leave, so that the counts
    of two classes are the class-1 count rounded half up.
    """
    quotas = size * np.asarray(class_probs, dtype=float)
    quotas[0] = max(size - quotas[1:].sum(), 0.0)
    counts = np.floor(quotas).astype(int)
    remainders = quotas - counts
    last_first = np.argsort(-remainders[::-1], kind="stable")
    counts[len(counts) - 1 - last_first[:size - counts.sum()]] += 1
    return counts


def draw_disjoint(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """Disjoint indices into ``labels``: part ``k`` holds ``counts[k, c]`` examples of class ``c``.

    Every class's examples are shuffled once, then dealt to the parts in order;
    each part's indices come in random order.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels of the pool.
    counts : np.ndarray
        (K, C) examples wanted per part and class.
    rng : np.random.Generator
        Source of the shuffles.

    Raises
    ------
    PoolTooSmall
        When the parts together need more examples of a class than the pool has.
    """
    counts = np.asarray(counts, dtype=int)
    num_classes = counts.shape[1]
    available = np.bincount(labels, minlength=num_classes)[:num_classes]
    needed = counts.sum(axis=0)
    for label in range(num_classes):
        if needed[label] > available[label]:
            raise PoolTooSmall(label, int(needed[label]), int(available[label]))
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    offsets = np.zeros(num_classes, dtype=int)
    parts = []
    for row in counts:
        picked = [pools[c][offsets[c]:offsets[c] + row[c]] for c in range(num_classes)]
        offsets += row
        parts.append(rng.permutation(np.concatenate(picked)))
    return parts


def max_site_size(available: np.ndarray, class_probs: np.ndarray) -> int:
    """Largest ``n`` such that every site can draw ``n`` examples with its class mix.

    Parameters
    ----------
    available : np.ndarray
        (C,) examples available per class.
    class_probs : np.ndarray
        (S, C) class distribution wanted at each site (rows sum to 1).
    """
    demand = class_probs.sum(axis=0)
    limits = [available[c] / demand[c] for c in range(len(demand)) if demand[c] > 0]
    return int(np.floor(min(limits)))


def partition_by_class_probs(
    labels: np.ndarray, class_probs: np.ndarray, rng: np.random.Generator,
    size: int | None = None,
) -> list[np.ndarray]:
    """Indices for each site: ``size`` examples whose class mix follows ``class_probs``.

    Sites get disjoint examples; site ``s`` receives
    ``class_counts(size, class_probs[s])`` of each class.

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
    per_site = np.stack([class_counts(size, probs) for probs in class_probs])
    return draw_disjoint(labels, per_site, rng)


def binary_class_probs(prevalences: list[float]) -> np.ndarray:
    """(S, 2) class distributions from each site's prevalence of class 1."""
    prev = np.asarray(prevalences, dtype=float)
    if np.any((prev < 0) | (prev > 1)):
        raise ValueError(f"prevalences must lie in [0, 1], got {prevalences}")
    return np.stack([1.0 - prev, prev], axis=1)
