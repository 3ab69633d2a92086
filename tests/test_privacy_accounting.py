"""Epsilon from the accountants against independent numerical computations."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant

from common import privacy_accounting
from common.privacy_accounting import (
    PRV_EPS_ERROR,
    RDP_ORDERS,
    GaussianRelease,
    PrivacyCertificate,
    certify,
    epsilon_spent,
    noise_for_budget,
)
from tests import independent_accountant

# DP-SGD at this project's settings, with what a run reserves besides it (moment
# summaries, evaluation, score histograms: plain Gaussian mechanisms).
RUN = [(4.73, 1 / 7, 70), (21.2, 1.0, 5), (20.0, 1.0, 1), (20.0, 1.0, 2)]


@pytest.mark.parametrize(("sigma", "q", "steps"), [
    (3.76, 1 / 7, 35),
    (1.1, 0.01, 1000),
    (8.0, 0.3, 50),
])
def test_epsilon_matches_independent_computation(sigma: float, q: float, steps: int) -> None:
    ours = epsilon_spent([GaussianRelease(sigma, q, steps)], 1e-5)
    expected = independent_accountant.epsilon([(sigma, q, steps)], 1e-5)
    assert ours == pytest.approx(expected, rel=1e-4)


def test_heterogeneous_releases_compose() -> None:
    releases = [(3.0, 0.1, 20), (5.0, 1.0, 1), (2.5, 0.05, 40)]
    ours = epsilon_spent([GaussianRelease(*r) for r in releases], 1e-6)
    assert ours == pytest.approx(independent_accountant.epsilon(releases, 1e-6), rel=1e-4)
    assert ours > epsilon_spent([GaussianRelease(*releases[0])], 1e-6)


@pytest.mark.parametrize("releases", [
    [(4.73, 1 / 7, 70)],
    [(1.1, 0.01, 1000)],
    [(8.0, 0.3, 50)],
    [(3.0, 1.0, 3)],
    RUN,
], ids=["issue", "many-steps", "high-rate", "plain-gaussian", "run-with-plain-gaussians"])
def test_prv_lies_within_its_error_of_google_pld(releases: list[tuple[float, float, int]]
                                                 ) -> None:
    cert = certify([GaussianRelease(*r) for r in releases], 1e-5)
    assert cert.prv_epsilon is not None
    # PLD rounded down and up brackets the true epsilon (add or remove, both
    # directions). PRV's upper end must not lie below the truth, nor more than its
    # two-sided error above it.
    below = independent_accountant.pld_epsilon(releases, 1e-5, pessimistic=False)
    above = independent_accountant.pld_epsilon(releases, 1e-5)
    assert below <= cert.prv_epsilon <= above + 2 * PRV_EPS_ERROR


@pytest.mark.parametrize("releases", [
    [(4.73, 1 / 7, 70)], [(3.0, 1.0, 3)], [(4.73, 1 / 7, 70), (20.0, 1.0, 3), (21.2, 1.0, 5)],
], ids=["issue", "plain-gaussian", "run"])
def test_prv_is_opacus_prv_accountant(releases: list[tuple[float, float, int]]) -> None:
    # The same floating-point operations as Opacus's accountant, on a composition in
    # the order the certificate sorts it.
    accountant = PRVAccountant()
    accountant.history = releases
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        expected = accountant.get_epsilon(1e-5, eps_error=PRV_EPS_ERROR)
    assert certify([GaussianRelease(*r) for r in releases], 1e-5).prv_epsilon == expected


@pytest.mark.parametrize("releases", [
    [(4.73, 1 / 7, 70)],
    RUN,
    [(3.0, 1.0, 3)],
    [(1.0, 0.1, 100)],
    [(1000.0, 1 / 7, 1)],  # PRV: no more than its error; RDP floors at about 0.1
    [(0.1, 1 / 7, 70)],  # RDP epsilon ~2500: PRV not asked
], ids=["issue", "run", "plain-gaussian", "low-noise", "huge-noise", "no-budget-there"])
def test_certificate_is_the_smaller_bound_and_names_it(releases: list[tuple[float, float, int]]
                                                       ) -> None:
    cert = certify([GaussianRelease(*r) for r in releases], 1e-5)
    assert cert.rdp_epsilon == epsilon_spent([GaussianRelease(*r) for r in releases], 1e-5)
    assert cert.epsilon <= cert.rdp_epsilon
    if cert.prv_epsilon is None:
        assert (cert.accountant, cert.epsilon) == ("rdp", cert.rdp_epsilon)
    else:
        assert cert.epsilon == min(cert.prv_epsilon, cert.rdp_epsilon)
        assert cert.accountant == ("prv" if cert.prv_epsilon <= cert.rdp_epsilon else "rdp")


def test_prv_is_not_asked_far_beyond_any_budget() -> None:
    start = time.perf_counter()
    cert = certify([GaussianRelease(0.1, 1 / 7, 70)], 1e-5)
    assert time.perf_counter() - start < 5  # PRV there took 15 s
    assert cert == PrivacyCertificate(cert.rdp_epsilon, "rdp", None, cert.rdp_epsilon)
    assert cert.rdp_epsilon > privacy_accounting.PRV_MAX_EPSILON


def test_a_composition_is_certified_however_it_is_ordered_or_split() -> None:
    releases = [GaussianRelease(*r) for r in RUN]
    split = [GaussianRelease(4.73, 1 / 7, 30), *releases[1:], GaussianRelease(4.73, 1 / 7, 40)]
    assert certify(releases, 1e-5) == certify(releases[::-1], 1e-5) == certify(split, 1e-5)


def test_plain_gaussian_releases_raise_no_warning() -> None:
    # Noise levels no other test uses, so that PRV really runs here.
    releases = [GaussianRelease(4.7301, 1 / 7, 70), GaussianRelease(19.9, 1.0, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cert = certify(releases, 1e-5)
    assert cert.accountant == "prv"


def test_no_release_spends_nothing() -> None:
    assert epsilon_spent([], 1e-5) == 0.0
    assert certify([], 1e-5) == PrivacyCertificate(0.0, "none", 0.0, 0.0)


def test_the_issue_figure_prv_needs_less_noise_than_rdp() -> None:
    # q = 1/7, 70 steps, epsilon 1 at delta 1e-5: RDP needs sigma ~5.10, PRV ~4.73.
    sigma = noise_for_budget(1.0, 1e-5, 1 / 7, 70)
    assert sigma == pytest.approx(4.73, abs=0.02)
    cert = certify([GaussianRelease(sigma, 1 / 7, 70)], 1e-5)
    assert cert.accountant == "prv" and cert.epsilon <= 1.0 < cert.rdp_epsilon
    assert epsilon_spent([GaussianRelease(5.10, 1 / 7, 70)], 1e-5) <= 1.0
    assert epsilon_spent([GaussianRelease(5.05, 1 / 7, 70)], 1e-5) > 1.0


def test_noise_search_evaluates_few_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counted(releases: list[GaussianRelease], delta: float) -> PrivacyCertificate:
        calls.append(releases)
        return certify(releases, delta)

    monkeypatch.setattr(privacy_accounting, "certify", counted)
    noise_for_budget(1.0, 1e-5, 1 / 7, 70, spent=[GaussianRelease(*r) for r in RUN[1:]])
    assert 2 <= len(calls) <= 6


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 1 / 7, 35), (1.0, 0.5, 2),
                                                   (0.3, 0.5, 10), (8.0, 0.01, 1000),
                                                   (1.0, 1.0, 3)])
def test_noise_for_budget_is_tight_and_never_overshoots(target: float, q: float,
                                                        steps: int) -> None:
    sigma = noise_for_budget(target, 1e-5, q, steps)
    assert certify([GaussianRelease(sigma, q, steps)], 1e-5).epsilon <= target
    # Within the search's relative tolerance (1e-3) of the smallest noise that fits.
    assert certify([GaussianRelease(sigma * (1 - 2e-3), q, steps)], 1e-5).epsilon > target


def test_noise_for_budget_accounts_for_what_was_spent() -> None:
    spent = [GaussianRelease(4.0, 0.1, 30)]
    fresh = noise_for_budget(2.0, 1e-5, 0.1, 30)
    after = noise_for_budget(2.0, 1e-5, 0.1, 30, spent=spent)
    assert after > fresh
    assert certify([*spent, GaussianRelease(after, 0.1, 30)], 1e-5).epsilon <= 2.0


def test_a_budget_below_what_rdp_can_certify_is_sized_by_prv() -> None:
    # RDP over orders up to 63 cannot go below about 0.1 at delta 1e-5, whatever the noise.
    assert epsilon_spent([GaussianRelease(1e4, 1 / 7, 70)], 1e-5) > 0.08
    sigma = noise_for_budget(0.08, 1e-5, 1 / 7, 70)
    cert = certify([GaussianRelease(sigma, 1 / 7, 70)], 1e-5)
    assert cert.accountant == "prv" and cert.epsilon <= 0.08


def test_a_budget_spent_already_is_refused() -> None:
    with pytest.raises(ValueError, match="used up by earlier releases"):
        noise_for_budget(1.0, 1e-5, 0.1, 10, spent=[GaussianRelease(1.0, 0.1, 200)])


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_non_positive_epsilon_is_refused(eps: float) -> None:
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        noise_for_budget(eps, 1e-5, 0.1, 10)


def test_independent_accountant_uses_the_same_orders() -> None:
    assert list(RDP_ORDERS) == independent_accountant.ORDERS
