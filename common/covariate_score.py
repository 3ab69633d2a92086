"""Covariate-shift score of each site against the rest of the federation, from DP moments.

Input per site: noisy per-class sums of per-image moment blocks
(:mod:`common.norm_moments`) and noisy per-class counts, with the std of the noise
on each. For site ``s`` the score compares its mean moment vector with the rest
of the federation's, where the rest's class-conditional means are mixed with the
site's own class fractions: a site whose prevalence differs but whose images per
class look like everyone else's scores zero (label shift is not covariate shift).

The reference is the federation's consensus: the pooled moments of the largest
group of sites consistent with one another (:func:`consensus_core`), so that
several shifted sites do not move the yardstick of the others.

Per layer ``l`` the divergence is the mean squared difference of the released
features (mean offset and spread of the layer's standardised input, see
:mod:`common.norm_moments`), made unbiased by subtracting the variance ``tau^2``
that the DP noise, the noisy counts and the finite sample add to each squared
difference. The score averages layers.

The threshold accounts for all three: with no shift, each squared difference minus
``tau^2`` has mean 0 and variance ``2 tau^4`` (Gaussian errors; the count-noise part
is one error shared by all coordinates and enters as such), so the score has a
known standard deviation; a site is flagged when its score exceeds ``z`` of them
(default ``z = 3``: about one false flag in 700 sites without shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.label_shift import normalise

FLAG_Z = 3.0
TOP_LAYERS = 3


@dataclass(frozen=True)
class SiteMoments:
    """One site's released moment sums (possibly accumulated over rounds).

    Attributes
    ----------
    sums : np.ndarray
        (classes, layers, width) noisy per-class sums of per-image blocks; the last
        value of a block is the per-image ``|u|^2 / clip``.
    counts : np.ndarray
        (classes,) noisy per-class counts.
    sum_noise_var : float
        Variance of the noise on each entry of ``sums``.
    count_noise_var : float (default: 0.0)
        Variance of the noise on each entry of ``counts``.
    """

    sums: np.ndarray
    counts: np.ndarray
    sum_noise_var: float
    count_noise_var: float = 0.0

    def __add__(self, other: SiteMoments) -> SiteMoments:
        return SiteMoments(self.sums + other.sums, self.counts + other.counts,
                           self.sum_noise_var + other.sum_noise_var,
                           self.count_noise_var + other.count_noise_var)


@dataclass(frozen=True)
class CovariateScore:
    """A site's covariate-shift score, its flag threshold and the layers that moved most."""

    score: float
    threshold: float
    flagged: bool
    layer_scores: tuple[float, ...]
    top_layers: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict:
        return {
            "covariate_score": self.score, "covariate_threshold": self.threshold,
            "covariate_flagged": self.flagged,
            "top_layers": [[name, value] for name, value in self.top_layers],
        }


def _positive(counts: np.ndarray) -> np.ndarray:
    return np.maximum(counts, 1.0)


class _Divergence:
    """Debiased per-layer divergences of one site from a reference set of sites."""

    def __init__(self, layer_names: tuple[str, ...], clip: float, width: int) -> None:
        self.layer_names = layer_names
        self.features = width - 1
        self.clip = clip

    def spread(self, ref: SiteMoments) -> np.ndarray:
        """(classes, layers) per-coordinate variance of per-image values within each class."""
        n = _positive(ref.counts)[:, None, None]
        mean = ref.sums / n
        second = self.clip * mean[:, :, -1]
        within = second - (mean[:, :, :-1] ** 2).sum(axis=2)
        return np.maximum(within, 0.0) / self.features

    def __call__(self, site: SiteMoments, ref: SiteMoments, z: float
                 ) -> tuple[float, float, np.ndarray]:
        prior = normalise(site.counts)
        n_site = _positive(site.counts)
        n_ref = _positive(ref.counts)
        mean_site = site.sums.sum(axis=0)[:, :-1] / n_site.sum()
        mean_ref = np.einsum("y,ylw->lw", prior / n_ref, ref.sums[:, :, :-1])
        noise = (len(prior) * site.sum_noise_var / n_site.sum() ** 2
                 + np.sum(prior**2 / n_ref**2) * ref.sum_noise_var)
        # A noisy count scales a whole mean: its error is the mean times the count's
        # relative error (small when the sites centred their features well).
        ref_means = ref.sums[:, :, :-1] / n_ref[:, None, None]
        counting = (mean_site**2 * len(prior) * site.count_noise_var / n_site.sum() ** 2
                    + np.einsum("y,ylw->lw", prior**2 * ref.count_noise_var / n_ref**2,
                                ref_means**2))
        weights = prior**2 * (1.0 / n_site + 1.0 / n_ref)
        sampling = np.einsum("y,yl->l", weights, self.spread(ref))
        independent = (noise + sampling)[:, None] * np.ones_like(counting)
        excess = (mean_site - mean_ref) ** 2 - independent - counting
        layer = excess.mean(axis=1)
        # A count error moves every coordinate at once, so its part of the squared
        # differences is correlated across coordinates: it adds to the variance of
        # their sum as one term, not as many independent ones.
        var = float(2 * np.sum(independent**2) + 4 * np.sum(independent * counting)
                    + 2 * np.sum(counting) ** 2) / self.features**2
        return float(layer.mean()), z * float(np.sqrt(var)) / len(layer), layer


def _pooled(sites: list[SiteMoments]) -> SiteMoments:
    return sum(sites[1:], sites[0])


def consensus_core(sites: dict[str, SiteMoments], divergence: _Divergence, z: float
                   ) -> list[str]:
    """The largest group of sites consistent with one another: the federation's standard.

    For every site, its neighbours are the sites whose divergence from it (both
    ways) stays under the threshold. The site with the most neighbours (ties: the
    smallest summed divergence) and its neighbours form the core. A plurality of
    sites sharing one protocol is what "the federation's data" means here; when
    every site differs from every other, the core is all sites.
    """
    names = list(sites)
    consistent = {n: [] for n in names}
    total = dict.fromkeys(names, 0.0)
    for a in names:
        for b in names:
            if a == b:
                continue
            score, threshold, _ = divergence(sites[a], sites[b], z)
            total[a] += max(score, 0.0)
            if score <= threshold:
                consistent[a].append(b)
    mutual = {a: [b for b in consistent[a] if a in consistent[b]] for a in names}
    best = min(names, key=lambda n: (-len(mutual[n]), total[n]))
    if not mutual[best]:
        return names
    return [best, *mutual[best]]


def federation_centre(sites: dict[str, SiteMoments], layer_names: tuple[str, ...],
                      clip: float, z: float = FLAG_Z) -> np.ndarray:
    """(classes, layers, features) class means of the consensus core's released features.

    In the coordinates the sites centred their features in; the server adds the
    centre it sent to obtain the next round's centre. Post-processing of the DP
    releases, so it costs no privacy.
    """
    first = next(iter(sites.values()))
    divergence = _Divergence(layer_names, clip, first.sums.shape[2])
    core = consensus_core(sites, divergence, z) if len(sites) > 1 else list(sites)
    pooled = _pooled([sites[n] for n in core])
    return pooled.sums[:, :, :-1] / _positive(pooled.counts)[:, None, None]


def covariate_scores(sites: dict[str, SiteMoments], layer_names: tuple[str, ...],
                     clip: float, z: float = FLAG_Z) -> dict[str, CovariateScore]:
    """Score every site against the federation's consensus (needs at least two sites).

    The reference of a site is the pooled moments of :func:`consensus_core`
    without the site itself (all other sites when the core would then be empty),
    so that shifted sites do not drag the reference of the others.

    Parameters
    ----------
    sites : dict[str, SiteMoments]
        Released moments per site name.
    layer_names : tuple[str, ...]
        Name of each layer (for ``top_layers``).
    clip : float
        Norm bound of a block (turns the last block value back into ``|u|^2``).
    z : float (default: 3.0)
        Flag threshold in standard deviations of the no-shift score.
    """
    if len(sites) < 2:
        return {}
    width = next(iter(sites.values())).sums.shape[2]
    divergence = _Divergence(layer_names, clip, width)
    core = consensus_core(sites, divergence, z)
    out = {}
    for name, site in sites.items():
        ref_names = [n for n in core if n != name] or [n for n in sites if n != name]
        score, threshold, layer = divergence(site, _pooled([sites[n] for n in ref_names]), z)
        order = np.argsort(-layer)[:TOP_LAYERS]
        out[name] = CovariateScore(
            score=score, threshold=threshold, flagged=score > threshold,
            layer_scores=tuple(float(v) for v in layer),
            top_layers=tuple((layer_names[i], float(layer[i])) for i in order),
        )
    return out
