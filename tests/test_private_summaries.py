"""Each DP mechanism adds the noise its ledger entry claims."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.privacy_accounting import GaussianRelease, epsilon_spent
from common.private_summaries import (
    clip_rows,
    combined_noise_multiplier,
    noisy_class_sums,
    noisy_histogram,
)


def test_histogram_noise_matches_its_claimed_multiplier() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([5.0, 0.0, 12.0])
    draws = []
    for _ in range(4000):
        noisy, release = noisy_histogram(counts, 4.0, rng)
        draws.append(noisy - counts)
    # Sensitivity 1: the noise std is the noise multiplier the ledger is charged.
    assert release == GaussianRelease(4.0, 1.0, 1)
    assert np.std(draws) == pytest.approx(release.noise_multiplier, rel=0.03)
    assert abs(np.mean(draws)) < 0.2


def test_class_sums_noise_matches_the_combined_release_charged() -> None:
    rng = np.random.default_rng(1)
    vectors = clip_rows(rng.normal(size=(50, 6)) * 3, 2.0)
    labels = rng.integers(0, 2, size=50)
    exact = np.zeros((2, 6))
    np.add.at(exact, labels, vectors)
    sum_noise, count_noise = [], []
    for _ in range(3000):
        noisy, release = noisy_class_sums(vectors, labels, 2, sensitivity=2.0,
                                          noise_multiplier=5.0, rng=rng)
        sum_noise.append(noisy.sums - exact)
        count_noise.append(noisy.counts - np.bincount(labels, minlength=2))
    assert noisy.sum_noise_std == 10.0
    assert np.std(sum_noise) == pytest.approx(10.0, rel=0.03)
    assert np.std(count_noise) == pytest.approx(5.0, rel=0.03)
    # Sums (sensitivity 2, noise 10) and counts (sensitivity 1, noise 5) together.
    assert release.noise_multiplier == pytest.approx(5.0 / math.sqrt(2))


def test_unclipped_vectors_and_bad_labels_are_refused() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="clip it first"):
        noisy_class_sums(np.ones((2, 4)), np.array([0, 1]), 2, 1.0, 1.0, rng)
    with pytest.raises(ValueError, match="labels"):
        noisy_class_sums(np.zeros((2, 4)), np.array([0, 2]), 2, 1.0, 1.0, rng)


def test_combined_multiplier_costs_what_the_parts_cost_together() -> None:
    parts = [GaussianRelease(3.0, 1.0, 1), GaussianRelease(7.0, 1.0, 1)]
    combined = GaussianRelease(combined_noise_multiplier(3.0, 7.0), 1.0, 1)
    assert epsilon_spent([combined], 1e-5) == pytest.approx(epsilon_spent(parts, 1e-5), rel=1e-9)


def test_clip_rows_bounds_norms_and_keeps_short_rows() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(rows, 1.0)
    assert np.linalg.norm(out, axis=1) == pytest.approx([1.0, 0.5])
    assert np.allclose(out[0], [0.6, 0.8])
