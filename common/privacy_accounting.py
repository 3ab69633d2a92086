"""Privacy accounting for DP-SGD and Gaussian releases (pure functions).

A mechanism run is a :class:`GaussianRelease`: ``steps`` applications of the
Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma`` and sample
rate ``q`` (``q = 1`` is the plain Gaussian mechanism). Releases compose in Renyi
DP (Mironov 2017; Mironov, Talwar, Zhang 2019) and convert to (epsilon, delta)
with the conversion Opacus uses (Balle et al. 2020), over Opacus's default orders.

A release's Renyi divergence is linear in its steps, so the per-step curve is
computed once per (sample rate, noise multiplier) and kept for the process: at
sample rate 1/2 Opacus's series for fractional orders takes about 0.3 s a call,
and a site's ledger asks for the same curves on every check and charge.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class GaussianRelease:
    """``steps`` runs of the sampled Gaussian mechanism (``sample_rate`` 1: unsampled)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """Renyi divergence of one step at each of :data:`RDP_ORDERS` (Opacus's analysis)."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                      orders=list(RDP_ORDERS))
    return tuple(float(v) for v in rdp)


def epsilon_spent(releases: Iterable[GaussianRelease], delta: float) -> float:
    """Epsilon of all ``releases`` composed, at ``delta``; 0 when there are none."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    total = [0.0] * len(RDP_ORDERS)
    any_release = False
    for r in releases:
        if r.steps <= 0:
            continue
        any_release = True
        per_step = _rdp_per_step(float(r.sample_rate), float(r.noise_multiplier))
        total = [a + b * r.steps for a, b in zip(total, per_step, strict=True)]
    if not any_release:
        return 0.0
    eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(eps)


def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    spent: Iterable[GaussianRelease] = (), tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier keeping ``spent`` plus ``steps`` new steps within budget.

    A bracketed search on the noise multiplier (interpolation in log-log, with
    bisection as the fallback) to a relative ``tolerance``; the answer never
    overshoots ``target_epsilon``. Each evaluation of a new noise level costs a
    Renyi curve (about 0.3 s at sample rate 1/2), so the search keeps them few.

    Raises
    ------
    ValueError
        When even very large noise cannot fit the budget (``spent`` alone exceeds it).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    spent = list(spent)

    def eps_at(sigma: float) -> float:
        return epsilon_spent([*spent, GaussianRelease(sigma, sample_rate, steps)], delta)

    # Bracket the answer: epsilon falls as the noise grows. eps(0) is infinite.
    low, eps_low = 0.0, math.inf
    high, eps_high = 1.0, eps_at(1.0)
    while eps_high > target_epsilon:
        low, eps_low = high, eps_high
        high *= 2
        if high > 1e4:
            raise ValueError(
                f"the budget epsilon={target_epsilon} is already used up by earlier "
                "releases; no noise level fits another release"
            )
        eps_high = eps_at(high)
    # Narrow it: log epsilon is close to linear in log sigma, so interpolation
    # predicts the answer, and a pair of probes just either side of the prediction
    # closes the bracket to the tolerance in one go when it is right; a bisection
    # step whenever a round does not halve the bracket keeps the worst case
    # bisection's. Every value returned was evaluated and fits the budget.
    while high - low > tolerance * high and not math.isclose(low, high):
        width = high - low
        guess = (low + high) / 2
        if low > 0 and math.isfinite(eps_low) and eps_low > eps_high > 0:
            t = math.log(eps_low / target_epsilon) / math.log(eps_low / eps_high)
            guess = low * (high / low) ** t
        for probe in (guess * (1 + tolerance / 2), guess * (1 - tolerance / 2)):
            if low < probe < high:
                eps = eps_at(probe)
                if eps <= target_epsilon:
                    high, eps_high = probe, eps
                else:
                    low, eps_low = probe, eps
        if high - low > width / 2:
            mid = (low + high) / 2
            eps = eps_at(mid)
            if eps <= target_epsilon:
                high, eps_high = mid, eps
            else:
                low, eps_low = mid, eps
    return high
