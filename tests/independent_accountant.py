"""Accountants written apart from the product's, for tests to check it against.

- RDP of the Poisson-subsampled Gaussian by numerical integration (any real order),
  composed by addition and converted to (epsilon, delta) as in Balle et al. 2020:
  the check of the product's RDP bound.
- Privacy loss distributions by Google's ``dp-accounting`` (PLD; add or remove one
  record, both directions), rounded up or down: an upper and a lower bound on the
  true epsilon, which bracket the product's PRV bound.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def rdp_sampled_gaussian(q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one step with sample rate ``q`` and noise multiplier ``sigma``.

    With mu0 = N(0, sigma^2) and mu = (1-q) mu0 + q N(1, sigma^2), the RDP is
    log(E_{z~mu0}[(mu(z)/mu0(z))^alpha]) / (alpha - 1) (Mironov, Talwar, Zhang 2019).
    """
    if q == 1.0:
        return alpha / (2 * sigma**2)

    def log_integrand(z: float) -> float:
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return alpha * log_ratio - z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))

    peak = max(log_integrand(z) for z in np.linspace(-10 * sigma, 10 * sigma + alpha, 2001))
    value, _ = integrate.quad(lambda z: math.exp(log_integrand(z) - peak),
                              -np.inf, np.inf, limit=500, epsabs=0, epsrel=1e-12)
    return (math.log(value) + peak) / (alpha - 1)


def epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of (noise multiplier, sample rate, steps) releases composed, at ``delta``."""
    best = math.inf
    for alpha in ORDERS:
        rdp = sum(steps * rdp_sampled_gaussian(q, sigma, alpha) for sigma, q, steps in releases)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


def pld_epsilon(releases: list[tuple[float, float, int]], delta: float,
                pessimistic: bool = True) -> float:
    """Epsilon of (noise multiplier, sample rate, steps) releases by ``dp-accounting``'s PLD.

    Parameters
    ----------
    releases : list[tuple[float, float, int]]
        The releases composed; sample rate 1 is the plain Gaussian mechanism.
    delta : float
        The delta at which epsilon is stated.
    pessimistic : bool
        Round privacy losses up (an upper bound on the true epsilon) or down (a
        lower bound).
    """
    composed = None
    for sigma, q, steps in releases:
        pld = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, pessimistic_estimate=pessimistic, sampling_prob=q,
            use_connect_dots=pessimistic,  # it rounds only up
        ).self_compose(steps)
        composed = pld if composed is None else composed.compose(pld)
    assert composed is not None, "no release"
    return float(composed.get_epsilon_for_delta(delta))


def epsilon_as(accountant: str, releases: list[tuple[float, float, int]],
               delta: float) -> float:
    """Upper bound on the releases' epsilon by the accountant here of ``accountant``'s kind.

    Parameters
    ----------
    accountant : str
        The product's accountant that certified the releases: ``rdp`` is checked
        by :func:`epsilon`, ``prv`` by the pessimistic :func:`pld_epsilon` (both
        near-exact numerical accountants).
    releases : list[tuple[float, float, int]]
        (noise multiplier, sample rate, steps) of each release.
    delta : float
        The delta at which epsilon is stated.
    """
    if accountant == "rdp":
        return epsilon(releases, delta)
    if accountant == "prv":
        return pld_epsilon(releases, delta)
    raise ValueError(f"unknown accountant {accountant!r}")
