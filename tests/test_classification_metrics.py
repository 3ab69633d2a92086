"""Metrics of predictions: multi-class AUROC over the classes a site has."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.classification_metrics import classification_metrics


def test_multiclass_auroc_is_sklearns_one_vs_rest_macro_when_every_class_is_present() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=60)
    labels = rng.integers(0, 3, 60)
    expected = roc_auc_score(labels, probs, multi_class="ovr")
    assert classification_metrics(labels, probs)["auroc"] == pytest.approx(expected)


def test_a_site_missing_a_class_gets_the_mean_over_its_classes() -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.1, 0.2, 0.7], [0.3, 0.1, 0.6]])
    labels = np.array([0, 0, 2, 2])  # class 1 absent, as at a label-skewed site
    metrics = classification_metrics(labels, probs)
    assert metrics["auroc"] == pytest.approx(1.0)  # class 0 and class 2 both ranked perfectly
    assert metrics["balanced_accuracy"] == pytest.approx(1.0)
    assert np.isnan(classification_metrics(np.zeros(4, int), probs)["auroc"])
