"""The label-shift estimators: exact without noise, honest intervals and charged noise with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.label_shift import BINARY_CENTRES
from common.private_summaries import combined_noise_multiplier
from common.shift_estimators import (
    ESTIMATORS,
    SharedCalibration,
    ShiftModel,
    estimators_for,
    release_noise_multiplier,
)
from simulations.shift_scoring import score_shift

SLOPE = 0.8
SOURCE = np.array([0.4, 0.6])
CELL0 = np.array([0.05, 0.15, 0.2, 0.25, 0.15, 0.1, 0.07, 0.03])
CELL1 = CELL0 * np.exp(SLOPE * BINARY_CENTRES)
CELL1 /= CELL1.sum()
CELLS = np.stack([CELL0, CELL1])
"""Class-conditional cell distributions whose posterior at every cell centre is exactly
logistic in the centre with slope ``SLOPE``: calibration by BCTS is exact."""


def _mixture(prior: np.ndarray) -> np.ndarray:
    return prior @ CELLS


def _model(size: float = 1e7) -> ShiftModel:
    return ShiftModel.fit([size * SOURCE[:, None] * CELLS], [0.0])


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("target", [0.1, 0.35, 0.8])
def test_each_estimator_recovers_the_prior_exactly_without_noise(name: str, target: float
                                                                 ) -> None:
    estimator = ESTIMATORS[name]
    model = _model()
    shared = model.shared()
    assert shared.slope == pytest.approx(SLOPE, rel=1e-5)
    prior = np.array([1 - target, target])
    statistic = estimator.statistic(400 * _mixture(prior), shared)
    np.testing.assert_allclose(estimator.estimate(statistic, shared), prior, atol=1e-5)


def test_local_mlls_on_per_image_posteriors_matches_the_released_statistic_without_noise(
) -> None:
    estimator = ESTIMATORS["mlls"]
    shared = _model().shared()
    prior = np.array([0.25, 0.75])
    counts = np.rint(1e5 * _mixture(prior)).astype(int)
    d = np.repeat(BINARY_CENTRES, counts)
    logits = np.stack([np.zeros_like(d), d], axis=1)
    local = estimator.local_estimate(logits, shared)
    np.testing.assert_allclose(local, prior, atol=1e-4)
    np.testing.assert_allclose(local, estimator.estimate(counts.astype(float), shared),
                               atol=1e-9)


def test_bbse_recovers_three_class_priors_exactly_with_the_hard_confusion() -> None:
    estimator = ESTIMATORS["bbse"]
    assert [e.name for e in estimators_for(3)] == ["bbse"]
    given = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])  # (true, predicted)
    model = ShiftModel.fit([np.array([[300.0], [200.0], [100.0]]) * given], [0.0])
    prior = np.array([0.2, 0.5, 0.3])
    shared = model.shared()
    np.testing.assert_allclose(estimator.estimate(estimator.statistic(
        1000 * prior @ given, shared), shared), prior, atol=1e-9)


def test_shared_calibration_crosses_the_wire_and_refuses_what_does_not_fit() -> None:
    shared = _model().shared()
    back = SharedCalibration.from_values(shared.to_values(), 2)
    assert (back.slope, back.bias, back.source_prior) == (
        shared.slope, shared.bias, shared.source_prior)
    np.testing.assert_allclose(back.confusion, shared.confusion)
    with pytest.raises(ValueError, match="must hold 8 finite numbers"):
        SharedCalibration.from_values(shared.to_values()[:-1], 2)
    with pytest.raises(ValueError, match="slope > 0"):
        SharedCalibration.from_values((-1.0, *shared.to_values()[1:]), 2)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_each_release_adds_the_noise_its_ledger_entry_claims(name: str) -> None:
    estimator = ESTIMATORS[name]
    shared = _model().shared()
    exact = estimator.statistic(400 * _mixture(np.array([0.5, 0.5])), shared)
    rng = np.random.default_rng(3)
    z = 7.0
    noise = []
    for _ in range(4000):
        noisy, release = estimator.release(exact, z, rng)
        noise.append(noisy - exact)
    # The ledger charges a Gaussian mechanism at ``z``; the noise is ``z`` x sensitivity.
    assert (release.noise_multiplier, release.sample_rate, release.steps) == (z, 1.0, 1)
    assert estimator.sensitivity == 1.0
    assert np.std(noise) == pytest.approx(z * estimator.sensitivity, rel=0.03)
    assert abs(np.mean(noise)) < 0.3


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_one_image_moves_each_statistic_by_at_most_its_sensitivity(name: str) -> None:
    estimator = ESTIMATORS[name]
    shared = _model().shared()
    base = estimator.statistic(np.full(len(BINARY_CENTRES), 50.0), shared)
    for cell in range(len(BINARY_CENTRES)):
        one = np.zeros(len(BINARY_CENTRES))
        one[cell] = 1.0
        moved = estimator.statistic(np.full(len(BINARY_CENTRES), 50.0) + one, shared)
        assert np.linalg.norm(moved - base) <= estimator.sensitivity + 1e-12


def test_the_estimators_share_one_gaussian_mechanisms_budget() -> None:
    for k in (2, 3):
        each = release_noise_multiplier(20.0, k)
        count = len(estimators_for(k))
        assert combined_noise_multiplier(*[each] * count) == pytest.approx(20.0)
    assert release_noise_multiplier(20.0, 2) == pytest.approx(20.0 * math.sqrt(2))


@pytest.fixture(scope="module")
def noisy_federations() -> list[tuple[ShiftModel, list[SharedCalibration]]]:
    """Federations whose pooled validation histograms carry DP noise, with their
    calibration replicates (the slow part, shared by the estimators' coverage tests)."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(10):
        exact = np.stack([rng.multinomial(800, CELL0), rng.multinomial(1200, CELL1)])
        model = ShiftModel.fit([exact + rng.normal(0.0, VAL_NOISE, exact.shape)], [VAL_NOISE])
        out.append((model, model.replicates(rng, 50)))
    return out


VAL_NOISE = 3.0


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_intervals_cover_the_true_prior_at_about_their_nominal_level(
        name: str, noisy_federations: list[tuple[ShiftModel, list[SharedCalibration]]]) -> None:
    """Sampling, calibration and DP noise on: 90 % intervals cover in >= 85 % of trials."""
    estimator = ESTIMATORS[name]
    rng = np.random.default_rng(12)
    release_noise = 5.0
    covered = []
    for model, replicates in noisy_federations:
        shared = model.shared()
        for target in (0.2, 0.5, 0.7, 0.85, 0.35, 0.6):
            labels = rng.random(400) < target
            cells = (rng.multinomial(int(labels.sum()), CELL1)
                     + rng.multinomial(int((~labels).sum()), CELL0)).astype(float)
            noisy, _ = estimator.release(estimator.statistic(cells, shared), release_noise, rng)
            estimate = estimator.combine(noisy, release_noise, model, replicates, rng)
            truth = [1 - labels.mean(), labels.mean()]
            covered.append(estimator.score(estimate.to_dict(estimator.key), truth)[
                f"{estimator.key}_covered"])
    assert np.mean(covered) >= 0.85, np.mean(covered)


def test_scoring_reports_each_estimators_l1_and_interval_coverage_over_sites() -> None:
    def site(low: float, high: float) -> dict:
        estimate = {"prior": [0.4, 0.6], "interval": [[1 - high, 1 - low], [low, high]]}
        return {**{f"deployment_prior{suffix}": estimate["prior"]
                   for suffix in ("", "_mlls", "_bbse")},
                **{f"deployment_prior{suffix}_interval": estimate["interval"]
                   for suffix in ("", "_mlls", "_bbse")}}

    final = {"sites": {"a": site(0.5, 0.7), "b": site(0.55, 0.65)}}
    truths = [{"name": n, "training_prior": [0.5, 0.5], "deployment_prior": [0.32, 0.68],
               "covariate_kind": "none", "severity": 0, "concept_fraction": 0}
              for n in ("a", "b")]
    scoring = score_shift(final, truths)
    assert scoring["sites"]["a"]["deployment_prior_covered"]
    assert not scoring["sites"]["b"]["deployment_prior_bbse_covered"]
    assert scoring["sites"]["a"]["deployment_prior_mlls_l1"] == pytest.approx(0.16)
    assert scoring["deployment_prior_coverage"] == scoring["deployment_prior_bbse_coverage"] == 0.5
