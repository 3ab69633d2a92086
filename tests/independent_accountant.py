"""An accountant written apart from the product's, for tests to check it against.

RDP of the Poisson-subsampled Gaussian by numerical integration (any real order),
composed by addition and converted to (epsilon, delta) as in Balle et al. 2020.
"""

from __future__ import annotations

import math

import numpy as np
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
