"""A site's own calibration and operating point for the global model (pure functions).

A federated model is trained on every site's data, so its raw scores suit no site
in particular: a site whose pneumonia prevalence is 0.9 and one at 0.4 need
different thresholds, and under DP the raw logits are often shrunk or shifted so
far that argmax calls every image one class. Each site therefore calibrates the
model on its own labelled validation split, locally (nothing is released):

- :func:`fit_calibration` fits a temperature and a per-class bias to the logits
  (bias-corrected temperature scaling), by maximum likelihood with a small pull
  towards the identity, and says whether the fit converged;
- :func:`choose_operating_point` turns the calibrated posteriors into decisions:
  by default the *balanced* point (the class with the largest posterior relative
  to the validation prior, which maximises expected balanced accuracy for a
  calibrated model), or for a binary task the threshold that keeps at least a
  target sensitivity on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

SMOOTHING = 1.0
"""Pseudo-count per class in the validation prior (a tiny split may lack a class)."""


@dataclass(frozen=True)
class LogitCalibration:
    """Calibrated log-posteriors ``log_softmax(logits / temperature + bias)``.

    Attributes
    ----------
    temperature : float
        Positive divisor of the logits (1: unchanged).
    bias : tuple[float, ...]
        Per-class offset added after the division.
    converged : bool
        Whether the fit met its tolerance; the identity is returned otherwise.
    """

    temperature: float = 1.0
    bias: tuple[float, ...] = ()
    converged: bool = True

    def log_probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) calibrated log-posteriors of (N, C) ``logits``."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.bias:
            z = z + np.asarray(self.bias)
        return log_softmax(z, axis=1)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) calibrated posteriors of (N, C) ``logits``."""
        return np.exp(self.log_probs(logits))


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if z.ndim != 2 or z.shape[1] < 2 or len(z) != len(y):
        raise ValueError(f"expected (N, C >= 2) logits and (N,) labels, got {z.shape} "
                         f"and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got {y.min()}..{y.max()}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    return z, y


def fit_calibration(logits: np.ndarray, labels: np.ndarray,
                    ridge: float = 1e-2) -> LogitCalibration:
    """Temperature and per-class bias maximising the likelihood of ``labels``.

    Parameters
    ----------
    logits : np.ndarray
        (N, C) raw model outputs on a labelled split.
    labels : np.ndarray
        (N,) classes in ``[0, C)``.
    ridge : float (default: 1e-2)
        Weight of a penalty ``ridge / 2 * (log T ** 2 + |bias|^2)`` that keeps a
        fit on a few images (or on one class) finite.

    Returns the identity (``converged=False``) when there are no images or the
    optimiser fails, so a site never acts on a diverged fit.
    """
    z, y = _check(logits, labels)
    k = z.shape[1]
    if len(y) == 0:
        return LogitCalibration(1.0, (0.0,) * k, converged=False)
    onehot = np.eye(k)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_t, bias = theta[0], theta[1:]
        scaled = z * np.exp(-log_t)
        logp = log_softmax(scaled + bias, axis=1)
        residual = np.exp(logp) - onehot                       # d loss / d (scaled + bias)
        loss = -np.sum(onehot * logp) + ridge / 2 * float(theta @ theta)
        grad = np.concatenate([[-np.sum(residual * scaled)], residual.sum(axis=0)])
        return float(loss), grad + ridge * theta

    result = minimize(objective, np.zeros(k + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 500, "gtol": 1e-8})
    if not result.success or not np.isfinite(result.x).all():
        return LogitCalibration(1.0, (0.0,) * k, converged=False)
    bias = result.x[1:] - result.x[1:].mean()      # softmax ignores a common offset
    return LogitCalibration(float(np.exp(result.x[0])), tuple(float(b) for b in bias))


@dataclass(frozen=True)
class OperatingPoint:
    """How a site turns the global model's logits into decisions.

    Attributes
    ----------
    calibration : LogitCalibration
        The site's temperature and bias.
    rule : str
        ``balanced`` or ``sensitivity``.
    prior : tuple[float, ...]
        Smoothed class shares of the validation split the point was chosen on.
    threshold : float or None
        Binary tasks: the calibrated probability of class 1 at or above which an
        image is called class 1.
    """

    calibration: LogitCalibration
    rule: str
    prior: tuple[float, ...]
    threshold: float | None = None

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """(N,) decisions for (N, C) ``logits``."""
        log_probs = self.calibration.log_probs(logits)
        if self.threshold is not None:
            return (np.exp(log_probs[:, 1]) >= self.threshold).astype(int)
        return np.argmax(log_probs - np.log(np.asarray(self.prior)), axis=1)

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "temperature": self.calibration.temperature,
                "bias": list(self.calibration.bias), "converged": self.calibration.converged,
                "prior": list(self.prior), "threshold": self.threshold}


def choose_operating_point(logits: np.ndarray, labels: np.ndarray,
                           target_sensitivity: float = 0.0) -> OperatingPoint:
    """Calibrate on a labelled split and choose the decision rule there.

    Parameters
    ----------
    logits, labels : np.ndarray
        (N, C) logits and (N,) labels of the site's validation split.
    target_sensitivity : float (default: 0.0)
        0: the balanced point. Otherwise (binary tasks only) the highest threshold
        whose sensitivity (recall of class 1) on the split is at least this.
    """
    z, y = _check(logits, labels)
    k = z.shape[1]
    if not 0 <= target_sensitivity < 1:
        raise ValueError(f"target sensitivity must lie in (0, 1) (0: balanced point), "
                         f"got {target_sensitivity}")
    if target_sensitivity and k != 2:
        raise ValueError(f"a target sensitivity needs a binary task, this one has {k} classes")
    calibration = fit_calibration(z, y)
    counts = np.bincount(y, minlength=k)[:k] + SMOOTHING
    prior = tuple(float(c) for c in counts / counts.sum())
    if k != 2:
        return OperatingPoint(calibration, "balanced", prior)
    p1 = calibration.probs(z)[:, 1]
    positives = np.sort(p1[y == 1])
    if not target_sensitivity:
        return OperatingPoint(calibration, "balanced", prior, threshold=prior[1])
    if len(positives) == 0:
        raise ValueError("the validation split has no positive images; a target "
                         "sensitivity cannot be set on it")
    # Calling the j smallest positives negative keeps sensitivity 1 - j / n.
    allowed_misses = int(np.floor((1 - target_sensitivity) * len(positives) + 1e-9))
    return OperatingPoint(calibration, "sensitivity", prior,
                          threshold=float(positives[allowed_misses]))
