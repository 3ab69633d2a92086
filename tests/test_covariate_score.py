"""Covariate-shift scores against synthetic moments with a known shift."""

from __future__ import annotations

import numpy as np
import pytest

from common.covariate_score import SiteMoments, covariate_scores, federation_centre

LAYERS, FEATURES, CLIP = 6, 2, 3.0
NAMES = tuple(f"layer{i}" for i in range(LAYERS))
WIDTH = FEATURES + 1


def _moments(class_means: np.ndarray, counts: np.ndarray, spread: float = 0.0,
             noise_std: float = 0.0, rng: np.random.Generator | None = None,
             count_noise_std: float | None = None) -> SiteMoments:
    """Exact (or noised) sums of per-image blocks with the given per-class means."""
    sums = np.zeros((len(counts), LAYERS, WIDTH))
    for y, n in enumerate(counts):
        sums[y, :, :-1] = n * class_means[y]
        second = (class_means[y] ** 2).sum(axis=1) + spread * FEATURES
        sums[y, :, -1] = n * second / CLIP
    noisy_counts = counts.astype(float)
    if count_noise_std is None:
        count_noise_std = noise_std / 10
    if noise_std:
        assert rng is not None
        sums = sums + rng.normal(0, noise_std, size=sums.shape)
        noisy_counts = noisy_counts + rng.normal(0, count_noise_std, size=len(counts))
    return SiteMoments(sums, noisy_counts, noise_std**2, count_noise_std**2)


def _score(sites: dict[str, SiteMoments]) -> dict:
    return covariate_scores(sites, NAMES, CLIP)


BASE = np.zeros((2, LAYERS, FEATURES))
BASE[1] += 0.5  # the two classes look different


def test_no_shift_and_no_noise_scores_exactly_zero_despite_label_shift() -> None:
    sites = {f"s{i}": _moments(BASE, np.array([n0, n1]))
             for i, (n0, n1) in enumerate([(800, 200), (300, 700), (100, 900)])}
    for score in _score(sites).values():
        assert score.score == pytest.approx(0.0, abs=1e-12)
        assert not score.flagged


def test_known_shift_is_recovered_exactly_and_located() -> None:
    shifted = BASE.copy()
    shifted[:, 2, :] += 0.3  # every moment of layer 2 moves by 0.3 at one site
    sites = {"a": _moments(BASE, np.array([500, 500])),
             "b": _moments(BASE, np.array([200, 800])),
             "c": _moments(shifted, np.array([500, 500]))}
    scores = _score(sites)
    assert scores["c"].layer_scores[2] == pytest.approx(0.09, abs=1e-12)
    assert scores["c"].score == pytest.approx(0.09 / LAYERS, abs=1e-12)
    assert scores["c"].top_layers[0][0] == "layer2"


def test_noise_is_debiased_and_the_threshold_holds_its_false_flag_rate() -> None:
    rng = np.random.default_rng(0)
    null_scores, flags, shifted_flags = [], [], []
    shifted = BASE.copy()
    shifted[:, :2, :] += 0.25
    for _ in range(300):
        sites = {f"s{i}": _moments(BASE, np.array([400, 600]), spread=0.05, noise_std=30.0,
                                   rng=rng) for i in range(3)}
        sites["x"] = _moments(shifted, np.array([400, 600]), spread=0.05, noise_std=30.0,
                              rng=rng)
        scores = _score(sites)
        null_scores.append(scores["s0"].score)
        flags.append(scores["s0"].flagged)
        shifted_flags.append(scores["x"].flagged)
    sd = scores["s0"].threshold / 3
    assert abs(np.mean(null_scores)) < 3 * sd / np.sqrt(len(null_scores)) + 0.1 * sd
    assert np.mean(flags) < 0.02
    assert np.mean(shifted_flags) > 0.95


def test_fewer_than_two_sites_give_no_scores() -> None:
    assert _score({"only": _moments(BASE, np.array([10, 10]))}) == {}


def test_federation_centre_is_the_consensus_core_class_means() -> None:
    shifted = BASE.copy()
    shifted += 2.0
    sites = {"a": _moments(BASE, np.array([300, 700])),
             "b": _moments(BASE, np.array([600, 400])),
             "c": _moments(shifted, np.array([500, 500]))}
    np.testing.assert_allclose(federation_centre(sites, NAMES, CLIP), BASE, atol=1e-12)


def test_noisy_counts_far_from_the_centre_widen_the_threshold_not_the_flags() -> None:
    rng = np.random.default_rng(1)
    far = BASE + 3.0  # features far from the centre the sites used
    flags = []
    for _ in range(200):
        sites = {f"s{i}": _moments(far, np.array([60, 540]), noise_std=30.0, rng=rng,
                                   count_noise_std=15.0) for i in range(3)}
        flags.extend(s.flagged for s in _score(sites).values())
    assert np.mean(flags) < 0.02
