"""Label-shift estimators, one registered class each: site side, DP release, server side, score.

The flow of a deployment estimate (``query.shift``):

1. Every site releases a DP score histogram of its labelled validation split
   (:mod:`client.shift_queries`, kind ``validation``). The server pools them into a
   :class:`ShiftModel`: the federation's calibration (binary tasks), source prior
   and soft confusion matrix. What it sends back, :class:`SharedCalibration`, is
   post-processing of DP releases and so public.
2. The site computes its pool's calibrated probabilities at full precision, runs
   every estimator locally (:meth:`LabelShiftEstimator.local_estimate`) and corrects
   its own predictions with the primary one: nothing leaves, no privacy is spent.
3. Each estimator releases one statistic of bounded L2 sensitivity with Gaussian
   noise (:meth:`LabelShiftEstimator.release`), charged to the ``deployment`` part
   of the site's ledger. The released prior is derived from it by post-processing
   (:meth:`LabelShiftEstimator.estimate`) at the server.
4. The server attaches a 90 % interval by parametric bootstrap
   (:meth:`LabelShiftEstimator.combine`): every replicate refits the calibration
   from the pooled validation histogram resampled with fresh DP noise of the
   released std (calibration), draws a pool of the released size from the fitted
   class-conditional cell distributions at the estimated prior (sampling), and adds
   fresh release noise of the known std (DP). All three are post-processing.

Why released statistics and not the local estimate: MLLS's fixed point has no
global sensitivity (one image can move it arbitrarily far when the scores barely
separate the classes), so a noised fixed point would not be a sound DP release.
Both statistics below are sums over images of a vector of L2 norm at most 1, so
adding or removing one image moves them by at most 1 in L2, and Gaussian noise of
std ``z`` is one Gaussian mechanism of noise multiplier ``z``. The pool size is not
released on its own: it is the sum of either statistic (post-processing).

A new estimator is one subclass here, registered with :func:`register_estimator`,
and its test; the site's noise plan reserves a release for every registered
estimator that applies, sharing the deployment budget equally.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from common.label_shift import (
    BINARY_CENTRES,
    Calibration,
    confusion_given_true,
    fit_bcts,
    hard_cell_posteriors,
    histogram,
    mlls,
    normalise,
    num_bins,
    score_bins,
)
from common.privacy_accounting import GaussianRelease
from common.registry import Registry

INTERVAL_LEVEL = 0.90
BOOTSTRAP_REPLICATES = 200


@dataclass(frozen=True)
class SharedCalibration:
    """What the federation sends every site with the deployment query (public).

    ``slope`` and ``bias`` calibrate the logit difference of binary tasks
    (identity for more classes); ``source_prior`` is the prior the calibrated
    posteriors hold at; ``confusion`` (predicted, true) is ``E[f(x) | y]`` of the
    per-cell posteriors ``f`` (soft, binary; hard, more classes).
    """

    slope: float
    bias: float
    source_prior: tuple[float, ...]
    confusion: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.source_prior)

    def calibration(self) -> Calibration:
        return Calibration(self.slope, self.bias, self.source_prior)

    def cell_posteriors(self) -> np.ndarray:
        """(bins, classes) posterior of each histogram cell under ``source_prior``."""
        if self.num_classes == 2:
            return self.calibration().posterior(BINARY_CENTRES)
        return hard_cell_posteriors(self.num_classes)

    def image_posteriors(self, logits: np.ndarray) -> np.ndarray:
        """(N, 2) calibrated posteriors of (N, 2) ``logits`` at full precision (binary)."""
        logits = np.asarray(logits, dtype=np.float64)
        return self.calibration().posterior(logits[:, 1] - logits[:, 0])

    def to_values(self) -> tuple[float, ...]:
        return (self.slope, self.bias, *self.source_prior,
                *(float(v) for v in np.ravel(self.confusion)))

    @classmethod
    def from_values(cls, values: Sequence[float], num_classes: int) -> SharedCalibration:
        """The calibration a query carries; ValueError when it does not fit the task."""
        k = num_classes
        if len(values) != 2 + k + k * k or not all(math.isfinite(v) for v in values):
            raise ValueError(f"calibration must hold {2 + k + k * k} finite numbers "
                             f"(slope, bias, {k} prior, {k}x{k} confusion), got {len(values)}")
        prior = np.asarray(values[2:2 + k])
        confusion = np.asarray(values[2 + k:]).reshape(k, k)
        if values[0] <= 0 or prior.min() < 0 or abs(prior.sum() - 1) > 1e-6 or (
                confusion.min() < 0):
            raise ValueError("calibration needs a slope > 0, a source prior on the simplex "
                             "and a non-negative confusion matrix")
        return cls(float(values[0]), float(values[1]), tuple(float(p) for p in prior), confusion)


@dataclass(frozen=True)
class ShiftModel:
    """The federation's view of every site's scores, from the pooled validation releases.

    Attributes
    ----------
    val_hist : np.ndarray
        (classes, bins) sum of the sites' noisy validation histograms.
    val_noise_var : float
        Variance of the DP noise on each cell of ``val_hist`` (the sum of the sites').
    calibration : Calibration or None
        The federation's calibration (binary tasks), fitted to ``val_hist``.
    """

    val_hist: np.ndarray
    val_noise_var: float
    calibration: Calibration | None

    @classmethod
    def fit(cls, val_hists: Sequence[np.ndarray], noise_stds: Sequence[float]) -> ShiftModel:
        total = np.sum(np.asarray(val_hists, dtype=np.float64), axis=0)
        calibration = fit_bcts(total) if total.shape[0] == 2 else None
        return cls(total, float(sum(s**2 for s in noise_stds)), calibration)

    @property
    def num_classes(self) -> int:
        return self.val_hist.shape[0]

    def shared(self) -> SharedCalibration:
        """The calibration sent to the sites, with the confusion matrix its cell
        posteriors give on the pooled validation histogram."""
        if self.calibration is not None:
            slope, bias = self.calibration.slope, self.calibration.bias
            prior = self.calibration.source_prior
        else:
            slope, bias = 1.0, 0.0
            prior = tuple(normalise(np.maximum(self.val_hist, 0).sum(axis=1)))
        identity = SharedCalibration(slope, bias, tuple(float(p) for p in prior),
                                     np.eye(self.num_classes))
        return replace(identity, confusion=confusion_given_true(
            self.val_hist, identity.cell_posteriors()))

    def cell_given_class(self) -> np.ndarray:
        """(classes, bins) fitted distribution of a class's images over the cells."""
        return np.stack([normalise(row) for row in self.val_hist])

    def replicates(self, rng: np.random.Generator, count: int = BOOTSTRAP_REPLICATES
                   ) -> list[SharedCalibration]:
        """Parametric-bootstrap replicates of the shared calibration: the validation images
        redrawn from the fitted cell distributions, fresh DP noise of the released
        variance, the calibration refit. Drawn once per run and used for every site."""
        sizes = np.maximum(np.rint(self.val_hist.sum(axis=1)), 1).astype(np.int64)
        cells = self.cell_given_class()
        std = math.sqrt(self.val_noise_var)
        out = []
        for _ in range(count):
            exact = np.stack([rng.multinomial(n, p) for n, p in zip(sizes, cells, strict=True)])
            out.append(ShiftModel.fit([exact + rng.normal(0.0, std, exact.shape)], [std]).shared())
        return out

    def pool_cells(self, prior: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """(bins,) cell counts of a pool of ``size`` images at class ``prior``."""
        return rng.multinomial(size, normalise(normalise(prior) @ self.cell_given_class()))


@dataclass(frozen=True)
class PriorEstimate:
    """A released deployment prior with its 90 % interval (per class, low and high)."""

    prior: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def to_dict(self, key: str) -> dict[str, Any]:
        return {key: self.prior.tolist(),
                f"{key}_interval": [self.low.tolist(), self.high.tolist()]}


class LabelShiftEstimator(ABC):
    """One label-shift estimator: what it computes at the site, releases and derives.

    ``sensitivity`` is the L2 sensitivity of :meth:`statistic` under adding or
    removing one pool image; :meth:`release` adds noise of std
    ``noise_multiplier * sensitivity``, which is the Gaussian mechanism the ledger
    charges at ``noise_multiplier``.
    """

    name: ClassVar[str]
    sensitivity: ClassVar[float] = 1.0

    @property
    def mechanism(self) -> str:
        """The ledger's mechanism name of this estimator's release."""
        return f"label-shift-{self.name}"

    @property
    def key(self) -> str:
        """The key of its estimate in the run's shift record."""
        return f"deployment_prior_{self.name}"

    def applies(self, num_classes: int) -> bool:
        return True

    @abstractmethod
    def statistic(self, cell_counts: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        """The exact statistic of a pool with (bins,) ``cell_counts``, before noise."""

    @abstractmethod
    def estimate(self, statistic: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        """The prior derived from a (noisy or exact) statistic: post-processing."""

    def local_estimate(self, pool_logits: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        """The site's own estimate from its pool's (N, classes) logits, at full precision;
        never released."""
        cells = histogram(score_bins(pool_logits), None, shared.num_classes)
        return self.estimate(self.statistic(cells, shared), shared)

    def release(self, statistic: np.ndarray, noise_multiplier: float,
                rng: np.random.Generator) -> tuple[np.ndarray, GaussianRelease]:
        """``statistic`` with Gaussian noise of std ``noise_multiplier * sensitivity``."""
        if noise_multiplier <= 0:
            raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
        noisy = statistic + rng.normal(0.0, noise_multiplier * self.sensitivity,
                                       np.shape(statistic))
        return noisy, GaussianRelease(noise_multiplier, 1.0, 1)

    def statistic_shape(self, num_classes: int) -> tuple[int, ...]:
        return (len(self.statistic(np.ones(num_bins(num_classes)),
                                   _identity_shared(num_classes))),)

    def combine(self, released: np.ndarray, noise_std: float, model: ShiftModel,
                replicates: Sequence[SharedCalibration], rng: np.random.Generator
                ) -> PriorEstimate:
        """The released prior and its interval (parametric bootstrap; module docstring).

        ``replicates`` are :meth:`ShiftModel.replicates` (calibration uncertainty); each
        is paired with a pool of the released size drawn at the estimated prior
        (sampling) and fresh release noise of ``noise_std`` (DP). The interval is the
        basic bootstrap one, ``2 * prior`` minus the replicates' quantiles, which
        corrects for the estimator's own bias (both clip onto the simplex), clipped to
        [0, 1].
        """
        shared = model.shared()
        prior = self.estimate(released, shared)
        size = max(round(float(np.sum(released))), 1)
        draws = [self.estimate(self.statistic(model.pool_cells(prior, size, rng), shared)
                               + rng.normal(0.0, noise_std, np.shape(released)), again)
                 for again in replicates]
        tail = (1 - INTERVAL_LEVEL) / 2
        low_q, high_q = np.quantile(np.asarray(draws), [tail, 1 - tail], axis=0)
        return PriorEstimate(prior, np.clip(2 * prior - high_q, 0, 1),
                             np.clip(2 * prior - low_q, 0, 1))

    def score(self, estimate: dict[str, Any], truth: Sequence[float]) -> dict[str, Any]:
        """L1 error of the estimate and whether its interval covers ``truth`` (every class)."""
        prior = estimate.get(self.key)
        interval = estimate.get(f"{self.key}_interval")
        truth_arr = np.asarray(truth, dtype=np.float64)
        l1 = None if prior is None else float(np.abs(np.asarray(prior) - truth_arr).sum())
        covered = None if interval is None else bool(np.all(
            (np.asarray(interval[0]) <= truth_arr + 1e-12)
            & (truth_arr <= np.asarray(interval[1]) + 1e-12)))
        return {f"{self.key}_l1": l1, f"{self.key}_covered": covered}


def _identity_shared(num_classes: int) -> SharedCalibration:
    return SharedCalibration(1.0, 0.0, tuple(np.full(num_classes, 1.0 / num_classes)),
                             np.eye(num_classes))


class MLLSEstimator(LabelShiftEstimator):
    """Maximum-likelihood label shift (EM; Saerens et al. 2002), binary tasks.

    Site: EM on every pool image's calibrated posterior at full precision.
    Release: the pool's histogram over the score cells (each image adds 1 to one
    cell: L2 sensitivity 1). Server: EM on the noisy histogram with the calibrated
    posterior of each cell.
    """

    name = "mlls"

    def applies(self, num_classes: int) -> bool:
        return num_classes == 2

    def statistic(self, cell_counts: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        return np.asarray(cell_counts, dtype=np.float64)

    def estimate(self, statistic: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        return mlls(statistic, shared.cell_posteriors(), np.asarray(shared.source_prior))

    def local_estimate(self, pool_logits: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        posteriors = shared.image_posteriors(pool_logits)
        return mlls(np.ones(len(posteriors)), posteriors, np.asarray(shared.source_prior))


class BBSEEstimator(LabelShiftEstimator):
    """Black-box shift estimation (Lipton et al. 2018) with the federation's soft confusion.

    Site and server solve ``C p = q``, ``q`` the pool's mean of the per-cell
    posteriors ``f`` (calibrated, binary; the predicted class, more classes).
    Release: the pool's soft class counts ``sum_i f(x_i)``; each image adds a
    probability vector, of L2 norm at most 1, whatever calibration the server sent:
    sensitivity 1. Two numbers instead of
    a histogram's eight, so the same noise disturbs ``q`` less.
    """

    name = "bbse"

    def statistic(self, cell_counts: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        return np.asarray(cell_counts, dtype=np.float64) @ shared.cell_posteriors()

    def estimate(self, statistic: np.ndarray, shared: SharedCalibration) -> np.ndarray:
        q = normalise(np.maximum(np.asarray(statistic, dtype=np.float64), 0.0))
        prior, *_ = np.linalg.lstsq(shared.confusion, q, rcond=None)
        return normalise(prior)


ESTIMATORS: Registry[LabelShiftEstimator] = Registry("label-shift estimator", ValueError)
register_estimator = ESTIMATORS.register


register_estimator(MLLSEstimator())
register_estimator(BBSEEstimator())


def estimators_for(num_classes: int) -> list[LabelShiftEstimator]:
    """The registered estimators for a task of ``num_classes``, primary first."""
    return [e for e in ESTIMATORS.values() if e.applies(num_classes)]


def release_noise_multiplier(deployment_noise: float, num_classes: int) -> float:
    """Noise multiplier of each estimator's release when the applicable estimators share
    one Gaussian mechanism's budget at ``deployment_noise``: ``m`` releases at
    ``deployment_noise * sqrt(m)`` compose to exactly one at ``deployment_noise``."""
    return deployment_noise * math.sqrt(len(estimators_for(num_classes)))
