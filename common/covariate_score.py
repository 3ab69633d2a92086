"""Covariate-shift score of each site against the rest of the federation, from DP moments.

Input per site: noisy per-class sums of per-image moment blocks
(:mod:`common.norm_moments`) and noisy per-class counts, with the std of the noise
on each, possibly accumulated over rounds. For site ``s`` the score compares its
mean moment vector with the reference's, where the reference's class-conditional
means are mixed with the site's own class fractions: a site whose prevalence
differs but whose images per class look like everyone else's scores zero (label
shift is not covariate shift).

The reference is the federation's consensus: the pooled moments of the largest
set of sites that are all consistent with one another, pair by pair
(:func:`consensus_core`), without the site scored. Several shifted sites therefore
cannot move the yardstick of the others as long as the unshifted sites agree with
each other and each shifted site differs from them and from the other shifted
sites in its own way (another kind, or another severity of the same kind). A
median of sites would not do: with 3 of 5 sites moved the same way (one scanner
at severities 1, 2, 3) the median is the severity-1 site.

Per layer ``l`` the divergence is the mean squared difference of the released
features (mean offset and spread of the layer's standardised input, softly
clipped; see :mod:`common.norm_moments`), made unbiased by subtracting the
variance ``tau^2`` that the DP noise, the noisy counts and the finite sample add to
each squared difference. The score averages layers. Rounds accumulated over the
same images (:meth:`SiteMoments.then`) average their DP noise down, but not
their sampling noise: the per-image variance is counted once, over the site's
images, not over its images times the rounds.

The threshold accounts for all three: with no shift, each squared difference minus
``tau^2`` has mean 0 and variance ``2 tau^4`` (Gaussian errors; the count-noise part
is one error shared by all coordinates and enters as such), so the score has a
known standard deviation; a site is flagged when its score exceeds ``z`` of them
(default ``z = 3``: about one false flag in 700 sites without shift).

What the synthetic tests (``tests/test_covariate_score.py``: five sites, 400
images each, five rounds over the same images, the default DP noise and clip)
support, and so what to trust:

* Three of five sites moved the same way (a scanner at severities 1, 2, 3) by 0.2
  or 0.3 per severity and feature, and three sites moved in different
  directions: Spearman with severity >= 0.9, every shifted site flagged, no
  unshifted site flagged, on every seed tried.
* A move of 0.1 per severity is about the DP resolution of a site's accumulated
  means: the severity-1 site is then consistent with the unshifted ones and the
  order of the low scores is noise (5 of 6 seeds fail the ranking).
* Moves of 0.45 per severity and beyond put the strongest sites at several
  times the soft clip's bound, where neighbouring severities differ by little:
  in 1 of 6 seeds the severity-2 and -3 sites were consistent with each other,
  tied the two unshifted sites for the core and won the tie (at 0.6 and 0.9 a
  hard clip failed 2 of 6, mean Spearman 0.36 against the soft clip's 0.67). The
  score is then still a flag but its order is not to be read.
* Small sites with a skewed prevalence (180 images, 20 % class 1) are so noisy
  that they are consistent with nearly every site and can join a shifted site
  into the core; their own scores carry wide thresholds.

Trust the flags; read the order of the scores only between sites that are
flagged and of similar size. Beside this score, :mod:`common.output_shift`
tests the model's outputs (BBSD).
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
        (classes,) noisy per-class counts (images times releases).
    sum_noise_var : float
        Variance of the noise on each entry of ``sums``.
    count_noise_var : float (default: 0.0)
        Variance of the noise on each entry of ``counts``.
    rounds : float (default: 1.0)
        Releases of the same images summed into ``sums``: ``counts / rounds`` is the
        number of distinct images, which bounds the sampling noise.
    """

    sums: np.ndarray
    counts: np.ndarray
    sum_noise_var: float
    count_noise_var: float = 0.0
    rounds: float = 1.0

    @property
    def images(self) -> np.ndarray:
        """(classes,) distinct images behind each class's sums (at least 1)."""
        return _positive(self.counts) / self.rounds

    def then(self, later: SiteMoments) -> SiteMoments:
        """These releases and a later release of the same images, accumulated."""
        return SiteMoments(self.sums + later.sums, self.counts + later.counts,
                           self.sum_noise_var + later.sum_noise_var,
                           self.count_noise_var + later.count_noise_var,
                           self.rounds + later.rounds)


def pool(sites: list[SiteMoments]) -> SiteMoments:
    """The releases of several sites (other images each) taken as one reference."""
    images = sum(float(s.images.sum()) for s in sites)
    counts = sum(s.counts for s in sites)
    return SiteMoments(sum(s.sums for s in sites), counts,
                       sum(s.sum_noise_var for s in sites),
                       sum(s.count_noise_var for s in sites),
                       float(_positive(counts).sum()) / images)


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
        weights = prior**2 * (1.0 / site.images + 1.0 / ref.images)
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


def _cliques(linked: dict[str, set[str]]) -> list[set[str]]:
    """Every maximal set of names linked pair by pair (Bron-Kerbosch with pivot)."""
    found: list[set[str]] = []

    def grow(clique: set[str], candidates: set[str], excluded: set[str]) -> None:
        if not candidates and not excluded:
            found.append(clique)
            return
        pivot = max(candidates | excluded, key=lambda n: len(linked[n] & candidates))
        for name in sorted(candidates - linked[pivot]):
            grow(clique | {name}, candidates & linked[name], excluded & linked[name])
            candidates = candidates - {name}
            excluded = excluded | {name}

    grow(set(), set(linked), set())
    return found


def consensus_core(sites: dict[str, SiteMoments], divergence: _Divergence, z: float
                   ) -> list[str]:
    """The largest set of sites all consistent with one another: the federation's standard.

    Two sites are consistent when the divergence of each from the other stays
    under its threshold. The core is the largest set of sites consistent pair by
    pair (ties: the smallest mean divergence within the set). A shifted site joins
    only when it is consistent with every member, so shifted sites that differ
    from one another cannot form or enter the core together. When no two sites
    are consistent, the core is all sites.
    """
    names = list(sites)
    scores = {(a, b): divergence(sites[a], sites[b], z)[:2]
              for a in names for b in names if a != b}
    linked = {a: {b for b in names if b != a and scores[a, b][0] <= scores[a, b][1]
                  and scores[b, a][0] <= scores[b, a][1]} for a in names}
    cliques = [c for c in _cliques(linked) if len(c) > 1]
    if not cliques:
        return names

    def spread(core: set[str]) -> float:
        pairs = [max(scores[a, b][0], 0.0) for a in core for b in core if a != b]
        return sum(pairs) / len(pairs)

    best = min(cliques, key=lambda c: (-len(c), spread(c), sorted(c)))
    return [n for n in names if n in best]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Median over the first axis of ``values`` with positive ``weights`` (one per row)."""
    order = np.argsort(values, axis=0)
    ranked = np.take_along_axis(values, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    half = np.argmax(cumulative >= 0.5 * cumulative[-1], axis=0)
    return np.take_along_axis(ranked, half[None], axis=0)[0]


def federation_centre(sites: dict[str, SiteMoments]) -> np.ndarray:
    """(classes, layers, features) per-value median over sites of their released class means.

    In the coordinates the sites centred their features in; the server adds the
    centre it sent to obtain the next round's centre. The median sits amid the
    sites, so that the soft clip compresses shifted sites in either direction as
    little as it can and one extreme site cannot move it far. A site's class mean
    weighs as many images as it holds of the class, up to half the most any site
    holds: a class a site barely has (a mean of noise) cannot move the centre,
    while sites of ordinary sizes count alike. It only centres the
    releases; the reference the scores use is :func:`consensus_core`'s.
    Post-processing of the DP releases, so it costs no privacy.
    """
    counts = np.stack([_positive(m.counts) for m in sites.values()])
    weights = np.minimum(counts, 0.5 * counts.max(axis=0))
    means = np.stack([m.sums[:, :, :-1] / _positive(m.counts)[:, None, None]
                      for m in sites.values()])
    return np.stack([_weighted_median(means[:, y], weights[:, y])
                     for y in range(means.shape[1])])


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
        score, threshold, layer = divergence(site, pool([sites[n] for n in ref_names]), z)
        order = np.argsort(-layer)[:TOP_LAYERS]
        out[name] = CovariateScore(
            score=score, threshold=threshold, flagged=score > threshold,
            layer_scores=tuple(float(v) for v in layer),
            top_layers=tuple((layer_names[i], float(layer[i])) for i in order),
        )
    return out
