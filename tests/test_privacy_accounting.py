"""Epsilon from the accountant against an independent numerical computation."""

from __future__ import annotations

import pytest

from common.privacy_accounting import (
    RDP_ORDERS,
    GaussianRelease,
    epsilon_spent,
    noise_for_budget,
)
from tests import independent_accountant


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


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 1 / 7, 35), (1.0, 0.5, 2),
                                                   (0.3, 0.5, 10), (8.0, 0.01, 1000),
                                                   (1.0, 1.0, 3)])
def test_noise_for_budget_is_tight_and_never_overshoots(target: float, q: float,
                                                        steps: int) -> None:
    sigma = noise_for_budget(target, 1e-5, q, steps)
    assert epsilon_spent([GaussianRelease(sigma, q, steps)], 1e-5) <= target
    # Within the search's relative tolerance (1e-3) of the smallest noise that fits.
    assert epsilon_spent([GaussianRelease(sigma * (1 - 2e-3), q, steps)], 1e-5) > target


def test_noise_for_budget_accounts_for_what_was_spent() -> None:
    spent = [GaussianRelease(4.0, 0.1, 30)]
    fresh = noise_for_budget(2.0, 1e-5, 0.1, 30)
    after = noise_for_budget(2.0, 1e-5, 0.1, 30, spent=spent)
    assert after > fresh
    assert epsilon_spent([*spent, GaussianRelease(after, 0.1, 30)], 1e-5) <= 2.0


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_non_positive_epsilon_is_refused(eps: float) -> None:
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        noise_for_budget(eps, 1e-5, 0.1, 10)


def test_independent_accountant_uses_the_same_orders() -> None:
    assert list(RDP_ORDERS) == independent_accountant.ORDERS


def test_no_release_spends_nothing() -> None:
    assert epsilon_spent([], 1e-5) == 0.0
