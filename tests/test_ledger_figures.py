"""The privacy figures a run's results take from each site's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.privacy_ledger import PrivacyLedger
from common.federation_config import FederationConfig
from common.privacy_accounting import GaussianRelease, certify
from simulations.runner import ledger_figures

SGD = GaussianRelease(4.0, 0.1, 20)
MOMENTS = GaussianRelease(30.0, 1.0, 1)
EVALUATION = GaussianRelease(20.0, 1.0, 1)


def test_figures_break_the_spend_down_by_kind_of_release(tmp_path: Path) -> None:
    path = tmp_path / "site-0.json"
    ledger = PrivacyLedger(path, 5.0, 1e-5)
    for r in (1, 2):
        ledger.charge(SGD, "run", r, f"DP-SGD round {r}")
        ledger.charge(MOMENTS, "run", r, f"moment summary round {r}", mechanism="moments")
    ledger.charge(EVALUATION, "run", 2, "evaluation round 2", part="test",
                  mechanism="evaluation")
    ledger.record_allowed("run", 2, "compute-seconds", "release timing")

    figures = ledger_figures(path, FederationConfig(epsilon=5.0))

    whole = certify([SGD, MOMENTS, SGD, MOMENTS, EVALUATION], 1e-5)
    assert figures["epsilon_spent"] == pytest.approx(whole.epsilon)
    assert figures["accountant"] == whole.accountant
    assert figures["epsilon_rdp"] == pytest.approx(whole.rdp_epsilon)
    assert figures["steps"] == 40
    assert [(r["mechanism"], r["part"], r["count"]) for r in figures["epsilon_by_release"]] == [
        ("dp-sgd", "train", 2), ("moments", "train", 2), ("evaluation", "test", 1)]
    alone = [certify([SGD, SGD], 1e-5), certify([MOMENTS, MOMENTS], 1e-5),
             certify([EVALUATION], 1e-5)]
    assert [r["epsilon"] for r in figures["epsilon_by_release"]] == pytest.approx(
        [c.epsilon for c in alone])
    assert max(c.epsilon for c in alone) < figures["epsilon_spent"] < sum(
        c.epsilon for c in alone)
