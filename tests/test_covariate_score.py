"""Covariate-shift scores against synthetic moments with a known shift."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from common.covariate_score import (
    CovariateScore,
    SiteMoments,
    _Divergence,
    consensus_core,
    covariate_scores,
    federation_centre,
)
from common.norm_moments import bounded_blocks

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


def test_federation_centre_is_the_median_of_the_sites_class_means() -> None:
    shifted = BASE.copy()
    shifted += 2.0
    sites = {"a": _moments(BASE, np.array([300, 700])),
             "b": _moments(BASE, np.array([600, 400])),
             "c": _moments(shifted, np.array([500, 500]))}
    np.testing.assert_allclose(federation_centre(sites), BASE, atol=1e-12)


def test_a_class_a_site_barely_has_does_not_move_the_centre() -> None:
    sites = {"a": _moments(BASE, np.array([300, 700])),
             "b": _moments(BASE + 0.1, np.array([600, 400]))}
    for name in ("c", "d"):  # one class-0 image each, far away: half the sites
        sites[name] = SiteMoments(np.full_like(sites["a"].sums, 50.0), np.array([1.0, 500.0]),
                                  0.0)
    centre = federation_centre(sites)
    np.testing.assert_allclose(centre[0], BASE[0] + 0.1, atol=1e-12)


def test_noisy_counts_far_from_the_centre_widen_the_threshold_not_the_flags() -> None:
    rng = np.random.default_rng(1)
    far = BASE + 3.0  # features far from the centre the sites used
    flags = []
    for _ in range(200):
        sites = {f"s{i}": _moments(far, np.array([60, 540]), noise_std=30.0, rng=rng,
                                   count_noise_std=15.0) for i in range(3)}
        flags.extend(s.flagged for s in _score(sites).values())
    assert np.mean(flags) < 0.02


# ---------------------------------------------- a federation simulated image by image

ROUNDS, NOISE_MULTIPLIER, MOMENT_CLIP, WIDE = 5, 30.0 / np.sqrt(5), 0.3, 4.0
SIZES = (400, 400, 400, 400, 400)
PRIORS = (0.3, 0.4, 0.5, 0.6, 0.7)
IMAGE_SD = 0.1
SEVERITIES = (0, 2, 3, 1, 0)  # as in shift5: sites 1-3 shifted, 0 and 4 not


def _released(deviations: np.ndarray, labels: np.ndarray, clip: float,
              rng: np.random.Generator, noise_multiplier: float) -> SiteMoments:
    """One round's DP release of a site's centred features, as the site makes it."""
    blocks = bounded_blocks(deviations, clip)
    sums = np.zeros((2, *blocks.shape[1:]))
    np.add.at(sums, labels, blocks)
    sum_std = noise_multiplier * clip * np.sqrt(2 * blocks.shape[1])
    counts = np.bincount(labels, minlength=2).astype(float)
    return SiteMoments(sums + rng.normal(0, sum_std, sums.shape),
                       counts + rng.normal(0, noise_multiplier, 2),
                       sum_std**2, noise_multiplier**2)


def _federation(shifts: list[np.ndarray], seed: int,
                noise_multiplier: float = NOISE_MULTIPLIER) -> dict[str, CovariateScore]:
    """Accumulated scores after ``ROUNDS`` rounds over the same images, the server's way.

    ``shifts[s]`` is the (layers, features) move of site ``s``'s images. Every round
    the model moves all sites' features alike; the first round, released at a wide
    clip, only sets the centre, as :meth:`server.shift_monitor.ShiftMonitor.moments_round`
    does.
    """
    rng = np.random.default_rng(seed)
    class_means = np.zeros((2, LAYERS, FEATURES))
    class_means[1] += 0.05
    images = []
    for size, prior, shift in zip(SIZES, PRIORS, shifts, strict=True):
        ones = round(size * prior)
        labels = rng.permutation(np.repeat([0, 1], [size - ones, ones]))
        own = class_means[labels] + shift + rng.normal(0, IMAGE_SD, (size, LAYERS, FEATURES))
        images.append((own, labels))
    centre = np.zeros((2, LAYERS, FEATURES))
    total: dict[str, SiteMoments] = {}
    clip = MOMENT_CLIP * WIDE
    for round_ in range(ROUNDS):
        drift = rng.normal(0, 0.02, (LAYERS, FEATURES))
        this_round = {f"s{s}": _released(own + drift - centre[labels], labels, clip, rng,
                                          noise_multiplier)
                      for s, (own, labels) in enumerate(images)}
        centre = centre + federation_centre(this_round)
        clip = MOMENT_CLIP
        if round_ > 0:
            total = {n: total[n].then(m) if n in total else m for n, m in this_round.items()}
    return covariate_scores(total, NAMES, clip)


def _scanner(severity: float, step: float) -> np.ndarray:
    """A scanner-like move: every layer and feature the same way, fading with depth."""
    depth = np.linspace(1.0, 0.5, LAYERS)[:, None]
    return severity * step * depth * np.ones((LAYERS, FEATURES))


@pytest.mark.parametrize("step", [0.2, 0.3])
def test_three_of_five_sites_shifted_the_same_way_are_ranked_by_severity(step: float) -> None:
    # The moderate and strong sites lie beyond a hard clip (about 0.21 per feature
    # in the first layers), which released them alike.
    for seed in range(3):
        scores = _federation([_scanner(s, step) for s in SEVERITIES], seed)
        values = [scores[f"s{i}"].score for i in range(len(SEVERITIES))]
        assert spearmanr(SEVERITIES, values).statistic >= 0.9, (step, seed, values)
        for i, severity in enumerate(SEVERITIES):
            assert scores[f"s{i}"].flagged == (severity > 0), (step, seed, i, values)


def test_shifts_of_different_kinds_are_ranked_and_only_they_are_flagged() -> None:
    rng = np.random.default_rng(5)
    directions = [np.zeros((LAYERS, FEATURES))] + [
        rng.normal(0, 1, (LAYERS, FEATURES)) for _ in range(3)] + [np.zeros((LAYERS, FEATURES))]
    directions = [d / max(np.abs(d).mean(), 1e-12) for d in directions]
    for seed in range(3):
        scores = _federation([0.15 * s * d for s, d in zip(SEVERITIES, directions,
                                                            strict=True)], seed)
        values = [scores[f"s{i}"].score for i in range(len(SEVERITIES))]
        assert spearmanr(SEVERITIES, values).statistic >= 0.9, (seed, values)
        assert [scores[f"s{i}"].flagged for i in range(5)] == [s > 0 for s in SEVERITIES]


def test_rounds_over_the_same_images_count_their_sampling_noise_once() -> None:
    # Almost no DP noise: the sampling noise of the images is all there is, and it
    # repeats every round. Counting it once keeps the stated no-shift spread honest.
    null = np.zeros((LAYERS, FEATURES))
    runs = [_federation([null] * 5, seed, noise_multiplier=1e-3) for seed in range(60)]
    scores = np.array([[r[f"s{i}"].score for i in range(5)] for r in runs])
    stated_sd = np.array([[r[f"s{i}"].threshold / 3 for i in range(5)] for r in runs])
    ratio = scores.std() / stated_sd.mean()
    assert 0.5 < ratio < 1.6, ratio
    assert np.mean([r[f"s{i}"].flagged for r in runs for i in range(5)]) < 0.03


def test_accumulating_rounds_adds_sums_and_noise_and_keeps_the_image_count() -> None:
    one = _moments(BASE, np.array([40, 60]))
    three = one.then(one).then(one)
    assert three.rounds == 3
    np.testing.assert_allclose(three.sums, 3 * one.sums)
    np.testing.assert_allclose(three.images, [40, 60])


def test_consensus_core_is_a_set_consistent_pair_by_pair() -> None:
    # b sits between a and c: a star around b would hold a, b and c although a and
    # c disagree; the core holds only sites that all agree with one another.
    sites = {"a": _moments(BASE, np.array([500, 500]), spread=0.05, noise_std=1.0,
                           rng=np.random.default_rng(0)),
             "b": _moments(BASE + 0.02, np.array([500, 500]), spread=0.05, noise_std=1.0,
                           rng=np.random.default_rng(1)),
             "c": _moments(BASE + 0.04, np.array([500, 500]), spread=0.05, noise_std=1.0,
                           rng=np.random.default_rng(2)),
             "d": _moments(BASE, np.array([300, 700]), spread=0.05, noise_std=1.0,
                           rng=np.random.default_rng(3))}
    divergence = _Divergence(NAMES, CLIP, WIDTH)
    core = consensus_core(sites, divergence, 3.0)
    scores = {(x, y): divergence(sites[x], sites[y], 3.0) for x in core for y in core if x != y}
    assert all(score <= threshold for score, threshold, _ in scores.values())
    assert set(core) in ({"a", "b", "d"}, {"a", "d"})
