"""The site's privacy ledger: refuses over-budget releases and survives restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.privacy_ledger import (
    BudgetExceeded,
    LedgerError,
    NoisePlan,
    PrivacyLedger,
    Reservation,
)
from common.privacy_accounting import GaussianRelease, epsilon_spent, noise_for_budget

ROUND = GaussianRelease(noise_multiplier=2.0, sample_rate=0.1, steps=10)


def test_charges_accumulate_and_match_the_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "site.json", target_epsilon=5.0, delta=1e-5)
    ledger.charge(ROUND, "run", 1, "round 1")
    eps = ledger.charge(ROUND, "run", 2, "round 2")
    assert eps == pytest.approx(epsilon_spent([ROUND, ROUND], 1e-5))
    assert ledger.epsilon_spent() == eps


def test_over_budget_release_is_refused_and_not_recorded(tmp_path: Path) -> None:
    sigma = noise_for_budget(1.0, 1e-5, 0.1, 20)
    half = GaussianRelease(sigma, 0.1, 10)
    ledger = PrivacyLedger(tmp_path / "site.json", target_epsilon=1.0, delta=1e-5)
    ledger.charge(half, "run", 1, "round 1")
    ledger.charge(half, "run", 2, "round 2")
    before = ledger.entries()
    with pytest.raises(BudgetExceeded, match=r"round 3.*above its budget of 1"):
        ledger.charge(half, "run", 3, "round 3")
    assert ledger.entries() == before
    assert ledger.epsilon_spent() <= 1.0


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledgers" / "site.json"
    first = PrivacyLedger(path, target_epsilon=3.0, delta=1e-5)
    plan = NoisePlan(2.0, 0.1, 10, 3, reserved=(Reservation("evaluation", "test", 20.0, 2),))
    first.charge(ROUND, "run-7", 1, "round 1", plan=plan)
    first.record_allowed("run-7", 1, "metrics", "allow-metrics")
    spent = first.epsilon_spent()

    restarted = PrivacyLedger(path, target_epsilon=3.0, delta=1e-5)
    assert restarted.epsilon_spent() == spent
    assert restarted.plan("run-7") == plan
    assert [e.steps for e in restarted.made("run-7", "dp-sgd")] == [10]
    assert [e.kind for e in restarted.entries()] == ["gaussian", "allowed"]
    # A second plan for the same run does not replace the first.
    restarted.charge(ROUND, "run-7", 2, "round 2", plan=NoisePlan(9.0, 0.5, 1, 1))
    assert restarted.plan("run-7") == plan
    assert sorted(p.name for p in path.parent.iterdir()) == ["site.json", "site.json.lock"]


def test_two_ledger_objects_on_one_file_do_not_lose_charges(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    a = PrivacyLedger(path, target_epsilon=10.0, delta=1e-5)
    b = PrivacyLedger(path, target_epsilon=10.0, delta=1e-5)
    a.charge(ROUND, "run", 1, "a")
    b.charge(ROUND, "run", 1, "b")
    assert len(PrivacyLedger(path, 10.0, 1e-5).releases()) == 2


def test_corrupt_ledger_refuses_to_release(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger(path, 1.0, 1e-5)


def test_changed_delta_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    PrivacyLedger(path, 1.0, 1e-5).charge(ROUND, "run", 1, "round 1")
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger(path, 1.0, 1e-6)
    assert json.loads(path.read_text())["delta"] == 1e-5


def test_refused_work_writes_nothing_not_even_its_plan(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    ledger = PrivacyLedger(path, target_epsilon=0.1, delta=1e-5)
    with pytest.raises(BudgetExceeded):
        ledger.charge(ROUND, "run", 1, "round 1", plan=NoisePlan(2.0, 0.1, 10, 3))
    assert not path.exists()


def test_an_entry_it_cannot_account_for_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    PrivacyLedger(path, 5.0, 1e-5).charge(ROUND, "run", 1, "round 1")
    data = json.loads(path.read_text())
    data["releases"][0]["noise_multiplier"] = 0.0
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="cannot account"):
        PrivacyLedger(path, 5.0, 1e-5)


def test_the_file_states_its_guarantee(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    PrivacyLedger(path, 5.0, 1e-5).charge(ROUND, "run", 1, "round 1")
    guarantee = json.loads(path.read_text())["guarantee"]
    assert guarantee["neighbouring"] == "add or remove one record"
    assert guarantee["composition"] == "sequential"
    assert guarantee["epsilon_spent"] == pytest.approx(epsilon_spent([ROUND], 1e-5))
