"""Metrics of a classifier's predictions (scikit-learn underneath)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score


def _balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (predicting an absent class
    is an error like any other, not a reason to warn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, preds))


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           predictions: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUROC and log loss of ``probs`` (N, C) for ``labels`` (N,).

    ``predictions`` (N,) are the decisions scored by the accuracies (a site's
    operating point, :mod:`common.operating_point`); None: the argmax of
    ``probs``. Binary tasks add sensitivity (recall of class 1) and specificity
    (recall of class 0) of those decisions, NaN where the class is absent.
    AUROC is one-vs-rest macro for more than two classes, over the classes present
    in ``labels`` (a label-skewed site may lack some), and NaN when the labels hold
    a single class.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1) if predictions is None else np.asarray(predictions)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} do not match labels {labels.shape}")
    present = np.unique(labels)
    if len(present) < 2:
        auroc = float("nan")
    elif num_classes == 2:
        auroc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auroc = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
    metrics = {
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": _balanced_accuracy(labels, preds),
        "auroc": auroc,
        "loss": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=list(range(num_classes)))),
    }
    if num_classes == 2:
        metrics["sensitivity"] = _recall(labels, preds, 1)
        metrics["specificity"] = _recall(labels, preds, 0)
    return metrics


def _recall(labels: np.ndarray, preds: np.ndarray, cls: int) -> float:
    of_class = labels == cls
    return float(np.mean(preds[of_class] == cls)) if of_class.any() else float("nan")
