"""Black-box shift detection (BBSD) on the model's outputs, from DP score histograms.

Beside the moment score (:mod:`common.covariate_score`), each site's deployment
pool is tested on what the model outputs (Rabanser et al., "Failing Loudly": a
two-sample KS test on a black-box model's outputs was the strongest detector
there). Under DP it uses only what the deployment query already releases, so it
costs no privacy: the noisy score histogram of every site's pool.

Label shift must not count. Under label shift alone every pool's score
distribution is a mixture ``sum_y pi_y P(bin | y)`` of the same class-conditional
distributions at the site's own prior ``pi``: with ``K`` classes the pools lie on
one ``K - 1``-dimensional affine subspace (for a binary task, one line through
the histograms). A site is therefore compared not with the federation's pooled
scores but with that subspace, fitted to the other sites' pools (their mean and
first ``K - 1`` principal directions): the distance left after projecting its pool
onto it is what a prior change cannot explain. The class-conditional histograms
themselves are not needed; the sites' validation histograms (80 images over 8
bins with DP noise of about 20 per cell) are too noisy to pin them down, while
the pools (hundreds of images each, at priors that differ between sites) fix the
subspace well.

The statistic is the squared distance between the pool's histogram and its
projection, summed over the bins. A KS distance (the largest gap between the two
CDFs), the paper's test, was tried first: the DP noise of the cells adds up along
a CDF, so at the deployment query's noise (about 20 per cell for 400 images) the KS
test missed a shift that made the model unsure of both classes (0 of 12 synthetic
pools flagged), which the summed squares, where each cell's noise enters once,
find. Its null distribution is simulated under label shift only, with
everything that moves it: every pool redrawn (multinomial) from its projection,
DP noise of the released std on every cell, and the subspace refitted each time.
A site is flagged when its distance exceeds the null mean by ``z`` null standard
deviations (the p-value is reported too). Two passes keep flagged sites out of
the reference of the others.

What BBSD cannot see: a covariate shift that moves a site's scores the way a
prior change would (all scores up or down along the line) looks like label shift
to any detector on a one-dimensional output. The moment score sees it.

Power, on the synthetic tests (histogram noise 20 per cell, 400-image pools, four
reference pools): pools at prior 0.95 beyond every reference prior are not
flagged; pools of a model made unsure of both classes (80 % of each class's
scores moved to the middle bins) are flagged in 9 of 12 draws; at 50 % the
distance is about twice the no-shift one but rarely beyond the threshold: the
subspace fitted to four noisy pools is itself uncertain, and the null accounts
for it.

Which to trust (from the synthetic tests of both modules): flag covariate shift
with the moment score, whose scores rank severities when the per-severity move
of the features is at least the DP resolution of the releases and the shifted
sites differ from one another; read BBSD beside it as evidence that a shift
reaches the model's decisions in a way prior correction cannot fix. A site that
BBSD flags and the moment score does not deserves a look at its pool (e.g. a
deployment pool from another scanner than its training images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.covariate_score import FLAG_Z

NULL_DRAWS = 500


@dataclass(frozen=True)
class OutputShift:
    """A site's BBSD result.

    Attributes
    ----------
    distance : float
        Squared distance of its normalised pool from the label-shift subspace of the
        other pools.
    excess : float
        ``distance`` above the null mean, in null standard deviations.
    p_value : float
        Share of null draws at least as far (with one added to both counts).
    flagged : bool
        ``excess > z``.
    """

    distance: float
    excess: float
    p_value: float
    flagged: bool

    def to_dict(self) -> dict:
        return {"output_shift_distance": self.distance, "output_shift_z": self.excess,
                "output_shift_p": self.p_value, "output_shift_flagged": self.flagged}


def _normalised(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1 / len(counts))


def label_shift_span(pools: list[np.ndarray], classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (K - 1, bins) orthonormal directions of the pools' normalised histograms."""
    points = np.stack([_normalised(p) for p in pools])
    mean = points.mean(axis=0)
    _, _, directions = np.linalg.svd(points - mean, full_matrices=False)
    return mean, directions[:classes - 1]


def _project(pool: np.ndarray, mean: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The normalised ``pool`` projected onto the span, made a distribution again."""
    point = mean + ((_normalised(pool) - mean) @ directions.T) @ directions
    return _normalised(np.maximum(point, 0.0))


def _distance(pool: np.ndarray, mean: np.ndarray, directions: np.ndarray) -> float:
    """Squared distance of the normalised ``pool`` from its projection, over the bins."""
    return float(np.sum((_normalised(pool) - _project(pool, mean, directions)) ** 2))


def output_shift(pool_hist: np.ndarray, pool_noise_std: float,
                 reference_pools: list[np.ndarray], reference_noise_std: list[float],
                 classes: int, z: float = FLAG_Z, draws: int = NULL_DRAWS,
                 seed: int = 0) -> OutputShift:
    """BBSD of one site's pool against the label-shift subspace of reference sites' pools.

    Parameters
    ----------
    pool_hist : np.ndarray
        (bins,) the site's noisy pool score histogram.
    pool_noise_std : float
        Std of the DP noise on each of its cells.
    reference_pools : list[np.ndarray]
        The reference sites' noisy pool histograms (at least ``classes`` of them
        for the subspace to be fitted, more for it to be tested).
    reference_noise_std : list[float]
        Per reference site, the std of the DP noise on each cell.
    classes : int
        Classes of the task (the subspace has ``classes - 1`` dimensions).
    z : float (default: 3.0)
        Flag when the distance exceeds the null mean by ``z`` null standard deviations.
    draws : int (default: 500)
        Simulated null draws.
    seed : int (default: 0)
        Seed of the null simulation (the result is deterministic in it).
    """
    mean, directions = label_shift_span(reference_pools, classes)
    distance = _distance(pool_hist, mean, directions)
    rng = np.random.default_rng(seed)

    def redraw(counts: np.ndarray, noise_std: float) -> np.ndarray:
        n = max(round(float(counts.sum())), 1)
        shape = _project(counts, mean, directions)
        return rng.multinomial(n, shape) + rng.normal(0.0, noise_std, counts.shape)

    null = np.empty(draws)
    for d in range(draws):
        pools = [redraw(p, sd) for p, sd in zip(reference_pools, reference_noise_std,
                                                strict=True)]
        null[d] = _distance(redraw(pool_hist, pool_noise_std),
                            *label_shift_span(pools, classes))
    p_value = float((1 + np.sum(null >= distance)) / (1 + draws))
    excess = float((distance - null.mean()) / max(float(null.std()), 1e-12))
    return OutputShift(distance, excess, p_value, excess > z)


def output_shifts(pool_hists: dict[str, np.ndarray], noise_std: dict[str, float],
                  classes: int, z: float = FLAG_Z, draws: int = NULL_DRAWS
                  ) -> dict[str, OutputShift]:
    """BBSD of every site with a pool against the other sites' pools.

    Two passes: first against all other sites, then against the other sites the
    first pass did not flag (all others when too few would be left), so that
    shifted sites do not bend the reference of the rest. Needs ``classes + 1``
    sites with pools (none: an empty result).
    """
    names = sorted(pool_hists)
    if len(names) < classes + 1:
        return {}

    def against(refs: dict[str, list[str]]) -> dict[str, OutputShift]:
        return {site: output_shift(pool_hists[site], noise_std[site],
                                   [pool_hists[n] for n in refs[site]],
                                   [noise_std[n] for n in refs[site]], classes, z, draws,
                                   seed=i)
                for i, site in enumerate(names)}

    others = {s: [n for n in names if n != s] for s in names}
    first = against(others)
    kept = {}
    for site, ref in others.items():
        unflagged = [n for n in ref if not first[n].flagged]
        kept[site] = unflagged if len(unflagged) >= classes + 1 else ref
    return against(kept) if kept != others else first
