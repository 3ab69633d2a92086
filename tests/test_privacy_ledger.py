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
from common.privacy_accounting import (
    GaussianRelease,
    PrivacyCertificate,
    certify,
    epsilon_spent,
    noise_for_budget,
)

ROUND = GaussianRelease(noise_multiplier=2.0, sample_rate=0.1, steps=10)


def test_charges_accumulate_and_match_the_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "site.json", target_epsilon=5.0, delta=1e-5)
    ledger.charge(ROUND, "run", 1, "round 1")
    eps = ledger.charge(ROUND, "run", 2, "round 2")
    assert eps == certify([ROUND, ROUND], 1e-5).epsilon
    assert ledger.epsilon_spent() == eps
    assert ledger.certificate() == certify([ROUND, ROUND], 1e-5)
    assert [e.accountant for e in ledger.entries()] == ["prv", "prv"]


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
    data = json.loads(path.read_text())
    guarantee = data["guarantee"]
    assert guarantee["neighbouring"] == "add or remove one record"
    assert guarantee["composition"] == "sequential"
    cert = certify([ROUND], 1e-5)
    assert guarantee["epsilon_spent"] == cert.epsilon == cert.prv_epsilon
    assert guarantee["accountant"] == "prv" and data["releases"][0]["accountant"] == "prv"
    assert guarantee["epsilon_prv"] == cert.prv_epsilon
    assert guarantee["epsilon_rdp"] == epsilon_spent([ROUND], 1e-5) > cert.epsilon


def test_a_release_that_fits_by_prv_but_not_by_rdp_is_charged(tmp_path: Path) -> None:
    # The setting: sigma 4.73 at q = 1/7 for 70 steps is epsilon 1 by PRV, 1.09 by RDP.
    run = GaussianRelease(4.73, 1 / 7, 70)
    ledger = PrivacyLedger(tmp_path / "site.json", target_epsilon=1.0, delta=1e-5)
    plan = NoisePlan(4.73, 1 / 7, 70, 1, accountant="prv")
    assert ledger.charge(run, "run", 1, "round 1", plan=plan) <= 1.0 < epsilon_spent([run], 1e-5)
    assert ledger.plan("run") == plan
    with pytest.raises(BudgetExceeded, match=r"to 1\.\d+ \(by PRV\), above its budget"):
        ledger.check(GaussianRelease(20.0, 1.0, 5), "more")


def test_a_ledger_written_before_prv_reads_as_certified_by_rdp(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    plan = NoisePlan(2.0, 0.1, 10, 3)
    old_entry = {"kind": "gaussian", "run": "old", "round": 1, "what": "round 1", "time": 0.0,
                 "part": "train", "mechanism": "dp-sgd", "noise_multiplier": 2.0,
                 "sample_rate": 0.1, "steps": 10, "allowed_by": "", "value": None}
    old_plan = {k: v for k, v in plan.to_json().items() if k != "accountant"}
    path.write_text(json.dumps({
        "version": 1, "delta": 1e-5, "plans": {"old": old_plan},
        "releases": [old_entry, {**old_entry, "kind": "allowed", "what": "loss",
                                 "allowed_by": "release train-loss"}],
        "guarantee": {"neighbouring": "add or remove one record", "composition": "sequential",
                      "epsilon_budget": 5.0, "delta": 1e-5,
                      "epsilon_spent": epsilon_spent([ROUND], 1e-5)}}))
    ledger = PrivacyLedger(path, 5.0, 1e-5)
    assert [e.accountant for e in ledger.entries()] == ["rdp", ""]
    assert ledger.plan("old") == plan and plan.accountant == "rdp"
    # What it spent is certified anew, now by the tighter bound.
    assert ledger.epsilon_spent() == certify([ROUND], 1e-5).epsilon < epsilon_spent([ROUND], 1e-5)
    ledger.charge(ROUND, "new", 1, "round 1")
    written = json.loads(path.read_text())
    assert [e["accountant"] for e in written["releases"]] == ["rdp", "", "prv"]
    assert written["plans"]["old"]["accountant"] == "rdp"


def test_an_entry_naming_an_unknown_accountant_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    PrivacyLedger(path, 5.0, 1e-5).charge(ROUND, "run", 1, "round 1")
    data = json.loads(path.read_text())
    data["releases"][0]["accountant"] = "guess"
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="cannot account"):
        PrivacyLedger(path, 5.0, 1e-5)


def test_parallel_parts_certify_each_part_and_state_each_accountants_epsilon(
        tmp_path: Path) -> None:
    train, test = GaussianRelease(4.73, 1 / 7, 70), GaussianRelease(3.0, 1.0, 2)
    ledger = PrivacyLedger(tmp_path / "site.json", 5.0, 1e-5, composition="parallel-parts")
    ledger.charge(train, "run", 1, "round 1")
    ledger.charge(test, "run", 1, "evaluation", "test", "evaluation")
    by_part = {"train": certify([train], 1e-5), "test": certify([test], 1e-5)}
    assert {p: ledger.certificate(p) for p in by_part} == by_part
    binding = max(by_part.values(), key=lambda c: c.epsilon)
    assert ledger.certificate() == PrivacyCertificate(
        binding.epsilon, binding.accountant,
        max(c.prv_epsilon or 0.0 for c in by_part.values()),
        max(c.rdp_epsilon for c in by_part.values()))
    sequential = PrivacyLedger(tmp_path / "seq.json", 5.0, 1e-5)
    sequential.charge(train, "run", 1, "round 1")
    sequential.charge(test, "run", 1, "evaluation", "test", "evaluation")
    assert sequential.certificate() == certify([train, test], 1e-5)
    assert sequential.epsilon_spent() > ledger.epsilon_spent()
