"""Privacy accounting for DP-SGD and Gaussian releases (pure functions).

A mechanism run is a :class:`GaussianRelease`: ``steps`` applications of the
Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma`` and sample
rate ``q`` (``q = 1`` is the plain Gaussian mechanism). Two accountants bound the
epsilon of a composition of releases at a given delta, and :func:`certify` takes
the smaller bound, naming the accountant that gave it:

- **PRV** (Gopi, Lee, Wutschitz 2021, as Opacus implements it): the privacy
  loss random variables of the releases, discretised and convolved. It returns
  an interval around the true epsilon; the certificate uses its upper end
  (estimate at ``delta - delta / 1000`` plus :data:`PRV_EPS_ERROR`), as Opacus's
  ``PRVAccountant.get_epsilon`` does. It is close to exact, so it needs about
  7 % less noise than RDP for the same guarantee at this project's settings.
- **RDP** (Mironov 2017; Mironov, Talwar, Zhang 2019): Renyi divergences added
  and converted to (epsilon, delta) as Opacus does (Balle et al. 2020), over
  Opacus's default orders. Looser, but no discretisation: the cross-check, and
  the bound used wherever PRV cannot answer.

Both are valid upper bounds, so their minimum is one too. A release's Renyi
divergence is linear in its steps, so the per-step curve is computed once per
(sample rate, noise multiplier) and kept for the process; a PRV epsilon is kept
per composition (the multiset of releases, however ordered or split), because a
site's ledger asks for the same compositions on every check and charge and one
PRV evaluation takes 0.05-0.6 s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

logger = logging.getLogger(__name__)

RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)

PRV_EPS_ERROR = 0.01
"""Width PRV may add to epsilon. Opacus's default: its mesh is proportional to it, so
0.003 costs 2-3x the time per evaluation to save 0.007 in epsilon (under 1 % of noise
at epsilon 1), while 0.03 would give up 0.02 of a budget of 1."""

PRV_MAX_EPSILON = 100.0
"""PRV is not asked about compositions whose RDP epsilon is above this: its domain
grows with epsilon (about 15 s at RDP epsilon 2500) and no budget lies there."""

ACCOUNTANTS = ("prv", "rdp")

_NoiseSearch = Callable[[float], float]


@dataclass(frozen=True)
class GaussianRelease:
    """``steps`` runs of the sampled Gaussian mechanism (``sample_rate`` 1: unsampled)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class PrivacyCertificate:
    """The epsilon of a composition at some delta, and which accountant certified it.

    Parameters
    ----------
    epsilon : float
        The certified epsilon: the smaller of the two bounds (0 for no release).
    accountant : str
        ``prv`` or ``rdp``: the accountant whose bound ``epsilon`` is; ``none``
        when nothing was released.
    prv_epsilon : float | None
        PRV's bound (the upper end of its error interval); None where PRV could
        not answer (its numerics failed, or the composition is far beyond any budget).
    rdp_epsilon : float
        RDP's bound.
    """

    epsilon: float
    accountant: str
    prv_epsilon: float | None
    rdp_epsilon: float


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """Renyi divergence of one step at each of :data:`RDP_ORDERS` (Opacus's analysis)."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                      orders=list(RDP_ORDERS))
    return tuple(float(v) for v in rdp)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def _composition(releases: Iterable[GaussianRelease]) -> tuple[tuple[float, float, int], ...]:
    """The releases as a sorted multiset: steps added up per (noise multiplier, sample rate)."""
    steps: Counter[tuple[float, float]] = Counter()
    for r in releases:
        if r.steps > 0:
            steps[float(r.noise_multiplier), float(r.sample_rate)] += int(r.steps)
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


def _rdp_epsilon(composition: tuple[tuple[float, float, int], ...], delta: float) -> float:
    total = [0.0] * len(RDP_ORDERS)
    for sigma, q, steps in composition:
        per_step = _rdp_per_step(q, sigma)
        total = [a + b * steps for a, b in zip(total, per_step, strict=True)]
    with warnings.catch_warnings():
        # Opacus warns when its largest order is the best: RDP's bound is then looser
        # than it could be, which the certificate (the smaller of PRV's and RDP's)
        # does not need, and a site's log should not repeat on every check.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                category=UserWarning)
        eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(eps)


def epsilon_spent(releases: Iterable[GaussianRelease], delta: float) -> float:
    """Epsilon of all ``releases`` composed, at ``delta``, by RDP alone; 0 when there are none.

    Parameters
    ----------
    releases : Iterable[GaussianRelease]
        The mechanism runs composed (in any order).
    delta : float
        The delta at which epsilon is stated, in (0, 1).
    """
    _check_delta(delta)
    composition = _composition(releases)
    return _rdp_epsilon(composition, delta) if composition else 0.0


def _prv_domain(composition: tuple[tuple[float, float, int], ...], delta_error: float
                ) -> Domain:
    """Where PRV discretises ``composition``: Opacus's rule, from the cached RDP curves.

    As ``PRVAccountant`` does (Gopi et al., remark 5.6): the domain reaches past the
    RDP epsilon of the whole composition at ``delta_error / 4`` and of each single
    step at ``delta_error / (8 x steps)``, plus 3; the mesh keeps the
    discretisation error within :data:`PRV_EPS_ERROR`. Opacus recomputes those
    RDP curves on every call, 90 % of a PRV evaluation at sample rate 1/2.
    """
    total = sum(steps for _, _, steps in composition)
    reach = max(_rdp_epsilon(composition, delta_error / 4),
                *(_rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total))
                  for sigma, q, _ in composition))
    reach = max(reach, PRV_EPS_ERROR) + 3
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)
    return Domain.create_aligned(-reach, reach, mesh)


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(composition: tuple[tuple[float, float, int], ...], delta: float
                 ) -> float | None:
    """PRV's upper bound on epsilon for ``composition``; None where its numerics fail.

    The same computation as Opacus's ``PRVAccountant.get_epsilon`` (its default
    ``delta_error`` of delta / 1000, ``eps_error`` :data:`PRV_EPS_ERROR`), from
    its analysis module.
    """
    delta_error = delta / 1000
    # Opacus's PRV takes log(1 - q), which numpy warns about at q = 1 (the plain
    # Gaussian, handled right: every privacy loss lies above log 0). The domain asks
    # RDP about delta / 4000, where the largest order is often the best: a looser
    # bound there only widens the domain.
    unsampled = any(q == 1.0 for _, q, _ in composition)
    with np.errstate(divide="ignore") if unsampled else contextlib.nullcontext(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                category=UserWarning)
        try:
            domain = _prv_domain(composition, delta_error)
            discrete = [
                discretize(TruncatedPrivacyRandomVariable(
                    PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max), domain)
                for sigma, q, _ in composition]
            composed = compose_heterogeneous(discrete, [steps for _, _, steps in composition])
            _, _, upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
        except (RuntimeError, ValueError, ArithmeticError, MemoryError) as exc:
            logger.warning("PRV accountant failed on %s at delta=%g (%s); RDP alone "
                           "certifies it", composition, delta, exc)
            return None
    eps = float(upper)
    return eps if math.isfinite(eps) else None


def certify(releases: Iterable[GaussianRelease], delta: float) -> PrivacyCertificate:
    """The certified epsilon of ``releases`` composed: the smaller of PRV's and RDP's bounds.

    Parameters
    ----------
    releases : Iterable[GaussianRelease]
        The mechanism runs composed (in any order, heterogeneous, sample rate 1 included).
    delta : float
        The delta at which epsilon is stated, in (0, 1).
    """
    _check_delta(delta)
    composition = _composition(releases)
    if not composition:
        return PrivacyCertificate(0.0, "none", 0.0, 0.0)
    rdp = _rdp_epsilon(composition, delta)
    prv = _prv_epsilon(composition, delta) if rdp <= PRV_MAX_EPSILON else None
    if prv is not None and prv <= rdp:
        return PrivacyCertificate(max(prv, 0.0), "prv", prv, rdp)
    return PrivacyCertificate(rdp, "rdp", prv, rdp)


def _guess(low: float, eps_low: float, high: float, eps_high: float, target: float,
           floor: float) -> float:
    """Where the noise search probes next, from its bracket [low, high].

    What the new steps add to epsilon above the ``floor`` (the epsilon of the
    releases spent already, which the new steps approach as their noise grows)
    is close to a power of sigma, so interpolation in log-log predicts the
    answer. Without a point above the target yet (``low`` 0), the power -1
    through ``high`` does: that excess falls at least as fast as 1/sigma for
    these mechanisms, so the guess lands at or below the answer and brackets it.
    """
    excess_low, excess_high, wanted = eps_low - floor, eps_high - floor, target - floor
    if low > 0 and math.isfinite(eps_low) and excess_low > excess_high > 0:
        t = math.log(excess_low / wanted) / math.log(excess_low / excess_high)
        return low * (high / low) ** t
    if low == 0 and excess_high > 0:
        return high * excess_high / wanted
    return (low + high) / 2


def _narrow(eps_at: _NoiseSearch, target: float, floor: float, tolerance: float,
            low: float, eps_low: float, high: float, eps_high: float) -> float:
    """The smallest noise that fits, to ``tolerance``, within [``low``, ``high``].

    ``eps_at(high)`` fits the ``target``; ``eps_at(low)`` does not, or ``low`` is 0.
    ``floor`` (below the target) is epsilon at infinite noise. A pair of probes
    just either side of each guess closes the bracket to the tolerance in one go
    when the guess is right; when the guess was off, the next one, from a
    bracket with a near end, seldom is. After two rounds in a row that do not
    halve a closed bracket, a bisection step keeps the worst case within a
    constant factor of bisection's. Every value returned was evaluated and fits.
    """
    slow_rounds = 0
    while high - low > tolerance * high and not math.isclose(low, high):
        width = high - low
        if low > 0 and slow_rounds >= 2:
            probes: tuple[float, ...] = ((low + high) / 2,)
        else:
            guess = _guess(low, eps_low, high, eps_high, target, floor)
            probes = (guess * (1 + tolerance / 2), guess * (1 - tolerance / 2))
        for probe in probes:
            if low < probe < high:
                eps = eps_at(probe)
                if eps <= target:
                    high, eps_high = probe, eps
                else:
                    low, eps_low = probe, eps
        slow_rounds = slow_rounds + 1 if low > 0 and high - low > width / 2 else 0
    return high


def _bracket_and_narrow(eps_at: _NoiseSearch, target: float, floor: float, tolerance: float
                        ) -> float | None:
    """The smallest noise that fits by ``eps_at``; None when none up to 1e4 does."""
    # Epsilon falls as the noise grows; eps(0) is infinite.
    low, eps_low = 0.0, math.inf
    high, eps_high = 1.0, eps_at(1.0)
    while eps_high > target:
        low, eps_low = high, eps_high
        high *= 2
        if high > 1e4:
            return None
        eps_high = eps_at(high)
    return _narrow(eps_at, target, floor, tolerance, low, eps_low, high, eps_high)


def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    spent: Iterable[GaussianRelease] = (), tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier keeping ``spent`` plus ``steps`` new steps within budget.

    The budget is met by the certified epsilon (:func:`certify`), to a relative
    ``tolerance`` on the noise multiplier, and never overshot: the answer is a
    value whose certificate was computed and fits. RDP is searched first (its
    curves are cheap and cached); its answer fits by the certificate too, which
    is then searched below it, starting where epsilon ~ 1/sigma predicts the
    answer, so that PRV is evaluated 3-6 times.

    Parameters
    ----------
    target_epsilon : float
        The budget, > 0.
    delta : float
        The delta at which it holds, in (0, 1).
    sample_rate : float
        Poisson sample rate of the new steps, in (0, 1].
    steps : int
        Number of new steps, >= 1.
    spent : Iterable[GaussianRelease]
        Releases the new steps compose with.
    tolerance : float
        Relative tolerance on the noise multiplier.

    Raises
    ------
    ValueError
        When even very large noise cannot fit the budget (``spent`` alone exceeds it,
        or it is below what the accountants can certify at ``delta``).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_delta(delta)
    spent = list(spent)
    floor = certify(spent, delta)
    if floor.epsilon >= target_epsilon:
        raise ValueError(f"the budget epsilon={target_epsilon} is already used up by earlier "
                         "releases; no noise level fits another release")

    def rdp_at(sigma: float) -> float:
        return epsilon_spent([*spent, GaussianRelease(sigma, sample_rate, steps)], delta)

    def certified_at(sigma: float) -> float:
        return certify([*spent, GaussianRelease(sigma, sample_rate, steps)], delta).epsilon

    by_rdp = None
    if floor.rdp_epsilon < target_epsilon:
        by_rdp = _bracket_and_narrow(rdp_at, target_epsilon, floor.rdp_epsilon, tolerance)
    if by_rdp is not None:
        return _narrow(certified_at, target_epsilon, floor.epsilon, tolerance, 0.0, math.inf,
                       by_rdp, certified_at(by_rdp))
    # Below RDP's floor (about 0.1 at delta 1e-5 with orders up to 63) only PRV can fit.
    sigma = _bracket_and_narrow(certified_at, target_epsilon, floor.epsilon, tolerance)
    if sigma is None:
        raise ValueError(
            f"the budget epsilon={target_epsilon} is below what the accountants certify "
            f"at delta={delta:g} after the earlier releases; no noise level fits another "
            "release"
        )
    return sigma
