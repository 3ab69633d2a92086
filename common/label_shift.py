"""Label-shift estimation and correction from DP score histograms.

A site never releases per-image predictions. It releases noisy histograms of the
global model's *score* of each image, a fixed binning that depends on nothing
private:

* binary tasks: the logit difference ``d = logit_1 - logit_0`` in the bins of
  :data:`BINARY_EDGES` (each bin is represented by :data:`BINARY_CENTRES`);
* more classes: the predicted class (BBSE only).

From a site's labelled validation histogram (one row per true class) and its
unlabelled deployment-pool histogram, everything below is post-processing, so
the server and the site compute the same numbers and no privacy is spent twice:

* :func:`fit_bcts` — bias-corrected temperature scaling (Alexandari et al.
  2020): ``p(y=1 | d) = sigmoid(a * d + b)``, ``a > 0``, fitted by weighted maximum
  likelihood, with a flag saying whether the fit converged;
* :func:`mlls` — maximum-likelihood label shift (Saerens et al. 2002): EM for the
  deployment priors given calibrated posteriors and their source priors;
* :func:`bbse` — black-box shift estimation (Lipton et al. 2018): solve
  ``C p = q`` with the confusion matrix ``C`` of predicted given true class, hard
  or soft (expected calibrated posteriors per true class);
* :func:`correct_priors` — Bayes' rule ``p_t(y|x) ∝ p_s(y|x) p_t(y) / p_s(y)``;
* :func:`concept_gap` — how much worse the labels fit than the model itself
  expects (loss minus entropy), after prior correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

BINARY_EDGES = np.array([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])
BINARY_CENTRES = np.array([-5.0, -3.0, -1.5, -0.5, 0.5, 1.5, 3.0, 5.0])
_EPS = 1e-12


def num_bins(num_classes: int) -> int:
    """Histogram cells per class row."""
    return len(BINARY_CENTRES) if num_classes == 2 else num_classes


def score_bins(logits: np.ndarray) -> np.ndarray:
    """Histogram cell of each row of (N, C) ``logits``."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 2:
        return np.searchsorted(BINARY_EDGES, logits[:, 1] - logits[:, 0], side="right")
    return logits.argmax(axis=1)


def histogram(cells: np.ndarray, labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """(classes, bins) counts of labelled cells, or (bins,) when ``labels`` is None."""
    bins = num_bins(num_classes)
    if labels is None:
        return np.bincount(cells, minlength=bins).astype(np.float64)
    out = np.zeros((num_classes, bins))
    np.add.at(out, (np.asarray(labels, dtype=np.int64), cells), 1.0)
    return out


def predicted_class_of_bin(num_classes: int) -> np.ndarray:
    """The class the uncalibrated model predicts for each cell."""
    if num_classes == 2:
        return (BINARY_CENTRES > 0).astype(np.int64)
    return np.arange(num_classes)


def _clean(counts: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(counts, dtype=np.float64), 0.0)


def normalise(p: np.ndarray) -> np.ndarray:
    """Project onto the probability simplex by clipping at 0 and renormalising."""
    p = np.maximum(np.asarray(p, dtype=np.float64), 0.0)
    s = p.sum()
    return p / s if s > 0 else np.full(len(p), 1.0 / len(p))


def binary_posteriors(d: np.ndarray) -> np.ndarray:
    """(N, 2) posteriors ``[1 - sigmoid(d), sigmoid(d)]`` at logit differences ``d``."""
    p1 = expit(np.asarray(d, dtype=np.float64))
    return np.stack([1.0 - p1, p1], axis=1)


SLOPE_BOUNDS = (1e-3, 100.0)
"""Range of the calibration slope: positive (a slope <= 0 would invert the posteriors),
and finite where the classes do not overlap in the histogram."""


@dataclass(frozen=True)
class Calibration:
    """``p(y=1 | d) = sigmoid(slope * d + bias)`` (binary) with the prior it was fitted at.

    ``converged`` says whether the fit met its tolerance; a failed fit is the identity
    (slope 1, bias 0) with ``converged`` False, so nobody acts on a diverged fit.
    """

    slope: float
    bias: float
    source_prior: tuple[float, ...]
    converged: bool = True

    def posterior(self, d: np.ndarray) -> np.ndarray:
        """(N, 2) calibrated posteriors at logit differences ``d``."""
        return binary_posteriors(self.slope * np.asarray(d, dtype=np.float64) + self.bias)


_GRAD_TOL = 1e-6
"""Largest projected gradient of the per-image loss at which a calibration fit has converged."""


def _projected_gradient(theta: np.ndarray, grad: np.ndarray,
                        bounds: list[tuple[float | None, float | None]]) -> float:
    """Largest gradient component that a step inside ``bounds`` could still follow."""
    out = 0.0
    for value, g, (low, high) in zip(theta, grad, bounds, strict=True):
        blocked = (low is not None and value <= low and g > 0) or (
            high is not None and value >= high and g < 0)
        out = max(out, 0.0 if blocked else abs(float(g)))
    return out


def fit_bcts(val_hist: np.ndarray, ridge: float = 1e-3) -> Calibration:
    """Bias-corrected temperature scaling fitted to a (2, bins) labelled histogram.

    Minimises the weighted logistic loss of the class on the bin centre (noisy
    negative counts read as 0) plus ``ridge / 2 * ((slope - 1)^2 + bias^2)``, a pull
    towards the identity, over slopes in :data:`SLOPE_BOUNDS` (L-BFGS-B; the
    objective is convex, so the bounded optimum is unique). The bound keeps the
    slope positive: on a noisy 80-image histogram the unconstrained optimum has a
    negative slope in about 5 % of sites, which inverts the posteriors; at the
    bound the posteriors are nearly the validation prior. Converged means the
    projected gradient of the per-image objective is at most ``_GRAD_TOL``. With a
    class missing, or when the optimiser fails, the identity is returned with
    ``converged`` False.
    """
    h = _clean(val_hist)
    if h.shape != (2, len(BINARY_CENTRES)):
        raise ValueError(f"expected a (2, {len(BINARY_CENTRES)}) histogram, got {h.shape}")
    w = h.sum(axis=0)
    prior = tuple(normalise(h.sum(axis=1)))
    identity = np.array([1.0, 0.0])
    if min(h.sum(axis=1)) <= 0:
        return Calibration(1.0, 0.0, prior, converged=False)
    x = np.stack([BINARY_CENTRES, np.ones_like(BINARY_CENTRES)], axis=1)
    n = float(w.sum())

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The penalised loss per image (scaled by 1 / n, so tolerances are relative)."""
        z = x @ theta
        loss = (np.sum(w * np.logaddexp(0.0, z)) - h[1] @ z
                + ridge / 2 * np.sum((theta - identity) ** 2))
        grad = x.T @ (w * expit(z) - h[1]) + ridge * (theta - identity)
        return float(loss) / n, grad / n

    bounds = [SLOPE_BOUNDS, (None, None)]
    result = minimize(objective, identity, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 1000, "ftol": 0.0, "gtol": 1e-10})
    if not (np.isfinite(result.x).all()
            and _projected_gradient(result.x, objective(result.x)[1], bounds) <= _GRAD_TOL):
        return Calibration(1.0, 0.0, prior, converged=False)
    return Calibration(float(result.x[0]), float(result.x[1]), prior)


def mlls(pool_hist: np.ndarray, posteriors: np.ndarray, source_prior: np.ndarray,
         iterations: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Deployment priors by EM over a histogram of images with known cell posteriors.

    Parameters
    ----------
    pool_hist : np.ndarray
        (bins,) images per cell (noisy counts read as 0 when negative).
    posteriors : np.ndarray
        (bins, classes) calibrated posterior of each cell under ``source_prior``.
    source_prior : np.ndarray
        (classes,) priors the posteriors were calibrated at.
    """
    c = _clean(pool_hist)
    src = normalise(source_prior)
    if c.sum() <= 0:
        return src
    prior = src.copy()
    for _ in range(iterations):
        w = prior / np.maximum(src, _EPS)
        adjusted = posteriors * w
        adjusted /= np.maximum(adjusted.sum(axis=1, keepdims=True), _EPS)
        new = normalise(c @ adjusted)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


def hard_cell_posteriors(num_classes: int) -> np.ndarray:
    """(bins, classes) one-hot rows: the class the uncalibrated model predicts per cell."""
    return np.eye(num_classes)[predicted_class_of_bin(num_classes)]


def _cell_posteriors(cell_posteriors: np.ndarray | None, num_classes: int) -> np.ndarray:
    if cell_posteriors is None:
        return hard_cell_posteriors(num_classes)
    post = np.asarray(cell_posteriors, dtype=np.float64)
    if post.shape != (num_bins(num_classes), num_classes):
        raise ValueError(f"expected ({num_bins(num_classes)}, {num_classes}) cell posteriors, "
                         f"got {post.shape}")
    return post


def confusion_given_true(val_hist: np.ndarray, cell_posteriors: np.ndarray | None = None
                         ) -> np.ndarray:
    """(predicted, true) matrix ``C[k, j] = E[f_k(x) | y = j]`` from (classes, bins) histograms.

    ``f`` is the classifier BBSE counts with: ``cell_posteriors`` (bins, classes), soft
    posteriors per cell (binary tasks: calibrated ones), or None for hard decisions
    by the uncalibrated model (:func:`hard_cell_posteriors`). Hard decisions from the
    sign of the raw score leave ``C`` singular when a model puts every image on one
    side of 0; soft posteriors keep the classes apart wherever the scores separate
    them.
    """
    h = _clean(val_hist)
    post = _cell_posteriors(cell_posteriors, h.shape[0])
    joint = post.T @ h.T  # (predicted, true)
    return joint / np.maximum(joint.sum(axis=0, keepdims=True), _EPS)


def bbse(pool_hist: np.ndarray, confusion: np.ndarray,
         cell_posteriors: np.ndarray | None = None) -> np.ndarray:
    """Deployment priors solving ``confusion @ p = q`` (least squares, then the simplex).

    ``q[k]`` is the pool's mean of ``f_k``, with the same ``cell_posteriors`` that
    made ``confusion`` (see :func:`confusion_given_true`). Under label shift
    ``E_pool[f] = C p`` for any fixed ``f``, so the estimate is exact on noise-free
    histograms whenever ``C`` is invertible.
    """
    num_classes = confusion.shape[0]
    post = _cell_posteriors(cell_posteriors, num_classes)
    q = normalise(_clean(pool_hist) @ post)
    p, *_ = np.linalg.lstsq(confusion, q, rcond=None)
    return normalise(p)


def correct_priors(probs: np.ndarray, target_prior: np.ndarray, source_prior: np.ndarray
                   ) -> np.ndarray:
    """Bayes' rule: reweight (N, C) posteriors from ``source_prior`` to ``target_prior``."""
    w = normalise(target_prior) / np.maximum(normalise(source_prior), _EPS)
    out = np.asarray(probs, dtype=np.float64) * w
    return out / np.maximum(out.sum(axis=1, keepdims=True), _EPS)


def importance_weights(site_prior: np.ndarray, federation_prior: np.ndarray) -> np.ndarray:
    """``p_site(y) / p_fed(y)`` per class."""
    return normalise(site_prior) / np.maximum(normalise(federation_prior), _EPS)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with ``bins`` equal-width confidence bins."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


@dataclass(frozen=True)
class ConceptGap:
    """Loss minus self-expected loss on a site's labelled histogram, with its noise std."""

    gap: float
    std: float


def concept_gap(val_hist: np.ndarray, posteriors: np.ndarray, noise_std: float) -> ConceptGap:
    """Mean log loss minus mean predictive entropy of ``posteriors`` per cell.

    A calibrated model on data whose labels mean what they meant in training has
    an expected gap of 0, whatever the images look like (hard images raise both
    terms). Labels that disagree with confident predictions raise only the loss.
    ``std`` combines the DP noise on each cell with the sampling noise of the labels.

    Parameters
    ----------
    val_hist : np.ndarray
        (classes, bins) noisy labelled histogram.
    posteriors : np.ndarray
        (bins, classes) the model's prior-corrected posterior per cell.
    noise_std : float
        Std of the DP noise on each histogram cell.
    """
    h = _clean(val_hist)
    n = max(h.sum(), 1.0)
    p = np.clip(posteriors, 1e-6, 1.0)
    loss = -np.log(p).T  # (classes, bins)
    entropy = (p * -np.log(p)).sum(axis=1)  # (bins,)
    gap = float(((h * loss).sum() - (h.sum(axis=0) * entropy).sum()) / n)
    dp_var = noise_std**2 * float(((loss - entropy[None, :]) ** 2).sum()) / n**2
    label_var = float((h.sum(axis=0) * ((p * loss.T**2).sum(axis=1) - entropy**2)).sum()) / n**2
    return ConceptGap(gap, float(np.sqrt(dp_var + label_var)))
