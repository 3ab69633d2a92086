"""A site's calibration and operating point, against known answers and scikit-learn."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from common.classification_metrics import classification_metrics
from common.operating_point import choose_operating_point, fit_calibration


def _binary(n: int, prevalence: float, temperature: float, bias: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) of a miscalibrated model whose calibrated log-odds are
    ``(z1 - z0) / temperature + bias``, and labels drawn from those odds."""
    rng = np.random.default_rng(seed)
    y_latent = rng.random(n) < prevalence
    score = rng.normal(np.where(y_latent, 1.5, -1.5), 1.0)
    logits = np.stack([np.zeros(n), score * temperature], axis=1)
    p1 = 1 / (1 + np.exp(-(score + bias)))
    labels = (rng.random(n) < p1).astype(int)
    return logits, labels


def test_the_fit_recovers_a_known_temperature_and_bias() -> None:
    logits, labels = _binary(20000, 0.5, temperature=4.0, bias=1.2, seed=0)
    cal = fit_calibration(logits, labels, ridge=0.0)
    assert cal.converged
    assert cal.temperature == pytest.approx(4.0, rel=0.05)
    assert cal.bias[1] - cal.bias[0] == pytest.approx(1.2, abs=0.08)


def test_the_fit_matches_logistic_regression_on_the_logit_difference() -> None:
    logits, labels = _binary(400, 0.8, temperature=0.3, bias=-0.5, seed=1)
    cal = fit_calibration(logits, labels, ridge=0.0)
    difference = (logits[:, 1] - logits[:, 0])[:, None]
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(difference, labels)
    ours = cal.probs(logits)[:, 1]
    theirs = reference.predict_proba(difference)[:, 1]
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_separable_or_one_class_splits_stay_finite_and_an_empty_one_is_the_identity() -> None:
    separable = np.array([[0.0, -2.0], [0.0, -1.0], [0.0, 1.0], [0.0, 2.0]])
    cal = fit_calibration(separable, np.array([0, 0, 1, 1]))
    assert np.isfinite(cal.temperature) and np.isfinite(cal.bias).all()
    assert np.isfinite(fit_calibration(separable, np.ones(4, int)).temperature)
    empty = fit_calibration(np.zeros((0, 2)), np.zeros(0, int))
    assert (empty.temperature, empty.bias, empty.converged) == (1.0, (0.0, 0.0), False)


def test_the_balanced_point_beats_argmax_when_a_shrunk_model_calls_everything_one_class() -> None:
    # A DP-trained model whose logits all lie above 0 at a site with prevalence 0.9.
    val_logits, val_labels = _binary(300, 0.9, temperature=0.1, bias=2.0, seed=2)
    test_logits, test_labels = _binary(3000, 0.9, temperature=0.1, bias=2.0, seed=3)
    shift = np.array([0.0, 0.5])
    point = choose_operating_point(val_logits + shift, val_labels)
    assert point.rule == "balanced"
    assert point.threshold == pytest.approx(point.prior[1])
    raw = classification_metrics(test_labels, np.full((3000, 2), 0.5),
                                 np.argmax(test_logits + shift, axis=1))
    ours = classification_metrics(test_labels, point.calibration.probs(test_logits + shift),
                                  point.decide(test_logits + shift))
    # The oracle: the true posterior (log-odds score + 2) against the true prevalence.
    true_p1 = 1 / (1 + np.exp(-(test_logits[:, 1] / 0.1 + 2.0)))
    oracle = classification_metrics(test_labels, np.stack([1 - true_p1, true_p1], 1),
                                    (true_p1 >= test_labels.mean()).astype(int))
    assert raw["balanced_accuracy"] < 0.6
    assert ours["balanced_accuracy"] > oracle["balanced_accuracy"] - 0.03
    assert abs(ours["sensitivity"] - ours["specificity"]) < 0.1


def test_a_target_sensitivity_is_met_on_validation_by_the_highest_such_threshold() -> None:
    logits, labels = _binary(200, 0.6, temperature=1.0, bias=0.0, seed=4)
    point = choose_operating_point(logits, labels, target_sensitivity=0.95)
    assert point.rule == "sensitivity"
    decided = point.decide(logits)
    assert np.mean(decided[labels == 1] == 1) >= 0.95
    p1 = point.calibration.probs(logits)[:, 1]
    higher = np.sort(p1[(labels == 1) & (p1 > point.threshold)])[0]
    assert np.mean(p1[labels == 1] >= higher) < 0.95


def test_more_classes_are_decided_against_the_validation_prior() -> None:
    rng = np.random.default_rng(5)
    labels = rng.choice(3, size=600, p=[0.7, 0.2, 0.1])
    logits = rng.normal(0, 1, (600, 3)) + 2.0 * np.eye(3)[labels]
    point = choose_operating_point(logits, labels)
    expected = np.argmax(point.calibration.log_probs(logits) - np.log(point.prior), axis=1)
    np.testing.assert_array_equal(point.decide(logits), expected)
    assert point.threshold is None
    with pytest.raises(ValueError, match="binary task"):
        choose_operating_point(logits, labels, target_sensitivity=0.9)


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5])
def test_an_unusable_target_sensitivity_is_refused(target: float) -> None:
    logits, labels = _binary(50, 0.5, 1.0, 0.0, seed=6)
    with pytest.raises(ValueError, match="target sensitivity"):
        choose_operating_point(logits, labels, target_sensitivity=target)


def test_metrics_score_the_decisions_given_with_sensitivity_and_specificity() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    probs = np.array([[0.2, 0.8]] * 5)
    metrics = classification_metrics(labels, probs, np.array([1, 1, 0, 0, 1]))
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(1 / 2)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
