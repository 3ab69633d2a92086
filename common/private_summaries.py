"""Gaussian mechanisms for the summaries a site releases about its data.

Every function here takes exact statistics of a site's private records, adds
Gaussian noise scaled to the statistic's sensitivity under adding or removing one
record, and returns the noisy statistic together with the
:class:`~common.privacy_accounting.GaussianRelease` that the site's ledger must
charge for it. Nothing else about the data leaves through these functions.

Sensitivities:

* a histogram (each record adds 1 to one cell): 1;
* a sum of per-record vectors clipped to norm ``S``: ``S``;
* per-class sums of per-record vectors clipped to norm ``S``, together with the
  per-class counts: ``S`` for the sums and 1 for the counts. Both are released with
  the same noise multiplier ``z`` (noise ``z * S`` on sums, ``z`` on counts), which
  is one Gaussian mechanism on the concatenation ``[v / S, 1]`` of sensitivity
  ``sqrt(2)``: the ledger charges noise multiplier ``z / sqrt(2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.privacy_accounting import GaussianRelease


def combined_noise_multiplier(*multipliers: float) -> float:
    """Noise multiplier of Gaussian mechanisms released together on the same records.

    Releasing parts with multipliers ``z_1 .. z_k`` (noise std over sensitivity)
    costs as much as one Gaussian mechanism with ``1 / sqrt(sum 1 / z_i**2)``.
    """
    if not multipliers or any(z <= 0 for z in multipliers):
        raise ValueError(f"noise multipliers must be > 0, got {multipliers}")
    return 1.0 / math.sqrt(sum(1.0 / z**2 for z in multipliers))


def noisy_histogram(counts: np.ndarray, noise_multiplier: float, rng: np.random.Generator
                    ) -> tuple[np.ndarray, GaussianRelease]:
    """A histogram with Gaussian noise of std ``noise_multiplier`` on every cell.

    Parameters
    ----------
    counts : np.ndarray
        Exact counts of any shape; every record must fall in exactly one cell.
    noise_multiplier : float
        Noise std over the sensitivity (1).
    rng : np.random.Generator
        Source of the noise.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    counts = np.asarray(counts, dtype=np.float64)
    noisy = counts + rng.normal(0.0, noise_multiplier, size=counts.shape)
    return noisy, GaussianRelease(noise_multiplier, 1.0, 1)


def clip_rows(vectors: np.ndarray, bound: float) -> np.ndarray:
    """Scale each row of (N, D) ``vectors`` down to L2 norm at most ``bound``."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def noisy_clipped_sum(vectors: np.ndarray, bound: float, noise_multiplier: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, GaussianRelease]:
    """The sum of per-record vectors, each first clipped to L2 norm ``bound``, with
    Gaussian noise of std ``noise_multiplier * bound`` on every entry.

    Adding or removing one record moves the clipped sum by at most ``bound``, so this
    is one Gaussian mechanism of multiplier ``noise_multiplier``.

    Parameters
    ----------
    vectors : np.ndarray
        (N, D) per-record vectors, any norm (they are clipped here).
    bound : float
        Clip norm of one record's vector: the sum's sensitivity.
    noise_multiplier : float
        Noise std over the sensitivity.
    rng : np.random.Generator
        Source of the noise.
    """
    if noise_multiplier <= 0 or bound <= 0:
        raise ValueError("noise multiplier and clip bound must be > 0")
    vectors = np.asarray(vectors, dtype=np.float64)
    total = clip_rows(vectors, bound).sum(axis=0)
    noisy = total + rng.normal(0.0, noise_multiplier * bound, size=total.shape)
    return noisy, GaussianRelease(noise_multiplier, 1.0, 1)


def class_sums_release(noise_multiplier: float, rounds: int = 1) -> GaussianRelease:
    """What ``rounds`` releases of :func:`noisy_class_sums` at ``noise_multiplier`` cost.

    Sums and counts go out together with the same multiplier, one Gaussian
    mechanism of multiplier ``noise_multiplier / sqrt(2)``.
    """
    return GaussianRelease(combined_noise_multiplier(noise_multiplier, noise_multiplier), 1.0,
                           rounds)


@dataclass(frozen=True)
class NoisyClassSums:
    """Per-class sums of clipped per-record vectors and per-class counts, with noise.

    Attributes
    ----------
    sums : np.ndarray
        (num_classes, D) noisy sums.
    counts : np.ndarray
        (num_classes,) noisy counts.
    sum_noise_std, count_noise_std : float
        Std of the noise added to every entry of ``sums`` and ``counts``.
    """

    sums: np.ndarray
    counts: np.ndarray
    sum_noise_std: float
    count_noise_std: float


def noisy_class_sums(vectors: np.ndarray, labels: np.ndarray, num_classes: int,
                     sensitivity: float, noise_multiplier: float, rng: np.random.Generator
                     ) -> tuple[NoisyClassSums, GaussianRelease]:
    """Per-class sums of ``vectors`` and per-class counts, released with Gaussian noise.

    Parameters
    ----------
    vectors : np.ndarray
        (N, D) per-record vectors, each of L2 norm at most ``sensitivity`` (checked).
    labels : np.ndarray
        (N,) class of each record in ``[0, num_classes)``.
    num_classes : int
        Number of classes (rows of the result).
    sensitivity : float
        Bound on the norm of one record's vector.
    noise_multiplier : float
        Noise std over the sensitivity for the sums and for the counts alike.
    rng : np.random.Generator
        Source of the noise.
    """
    if noise_multiplier <= 0 or sensitivity <= 0:
        raise ValueError("noise multiplier and sensitivity must be > 0")
    vectors = np.asarray(vectors, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(vectors) and np.linalg.norm(vectors, axis=1).max() > sensitivity * (1 + 1e-9):
        raise ValueError("a record's vector exceeds the sensitivity; clip it first")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    sums = np.zeros((num_classes, vectors.shape[1]))
    np.add.at(sums, labels, vectors)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sum_std = noise_multiplier * sensitivity
    noisy = NoisyClassSums(
        sums=sums + rng.normal(0.0, sum_std, size=sums.shape),
        counts=counts + rng.normal(0.0, noise_multiplier, size=counts.shape),
        sum_noise_std=sum_std, count_noise_std=noise_multiplier,
    )
    return noisy, class_sums_release(noise_multiplier)
