"""Scenario sites named after hospitals keep their names from the scenario to the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.release_policy import SitePolicy
from client.site_runtime import resolve_site
from common.federation_config import FederationConfig
from common.operating_point import choose_operating_point
from common.prediction import CalibratedPredictions
from common.privacy_accounting import GaussianRelease
from simulations.runner import _site_results, scenario_config, simulated_sites
from simulations.scenario import ScenarioError, load_scenario
from simulations.shift_scoring import score_shift
from tests.test_scenario import synthetic_splits

NAMED = """
seed = 1
[defaults]
train = 12
val = 6
test = 6
pool = 6
[[sites]]
name = "st-marys"
prevalence = 0.5
[[sites]]
name = "royal-north"
prevalence = 0.25
covariate = {kind = "blur", severity = 1}
"""
NAMES = ["st-marys", "royal-north"]


@pytest.fixture
def named_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FederationConfig, tuple]:
    """The run config of a two-site scenario with hospital names, and its built sites."""
    path = tmp_path / "hospitals.toml"
    path.write_text(NAMED)
    splits = synthetic_splits({"train": (40, 40), "val": (10, 10), "test": (10, 10)}, size=16)
    monkeypatch.setattr("simulations.runner.load_image_dataset", lambda *args: splits)
    cfg = scenario_config(FederationConfig(scenario=str(path), image_size=16,
                                           state_dir=str(tmp_path / "state")))
    simulated_sites.cache_clear()
    return cfg, simulated_sites(cfg)


def fake_scores(labels: np.ndarray) -> CalibratedPredictions:
    margin = np.where(labels == 1, 1.0, -1.0) + np.linspace(-0.5, 0.5, len(labels))
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    point = choose_operating_point(logits, labels)
    return CalibratedPredictions(logits, point.calibration.probs(logits), point.decide(logits),
                                 point)


def test_simulated_site_runs_under_its_scenario_name(named_run: tuple) -> None:
    cfg, simulated = named_run
    assert [s.name for s in simulated.sites] == NAMES
    for index, name in enumerate(NAMES):
        runtime = resolve_site(cfg, {"partition-id": index}, "run-1",
                               lambda _: simulated.sites, SitePolicy())
        assert runtime.name == name
        assert runtime.data is simulated.sites[index]


def test_named_sites_results_find_their_ledgers(named_run: tuple) -> None:
    cfg, simulated = named_run
    for index in range(len(NAMES)):
        runtime = resolve_site(cfg, {"partition-id": index}, "run-1",
                               lambda _: simulated.sites, SitePolicy())
        assert runtime.ledger is not None
        runtime.ledger.charge(GaussianRelease(4.0, 0.05, 10 * (index + 1)), "run-1", 1, "round 1")
    scored = {s.name: fake_scores(s.labels["test"].numpy()) for s in simulated.sites}
    rows = _site_results(cfg, simulated.sites, scored)
    assert [row["name"] for row in rows] == NAMES
    spent = [row["epsilon_spent"] for row in rows]
    assert all(e is not None and e > 0 for e in spent), spent
    assert spent[0] < spent[1]  # each row reads its own site's ledger
    assert [row["steps"] for row in rows] == [10, 20]


def test_shift_scoring_finds_sites_by_the_names_they_run_under(named_run: tuple) -> None:
    cfg, simulated = named_run
    final = {"sites": {}}
    for index in range(len(NAMES)):
        runtime = resolve_site(cfg, {"partition-id": index}, "run-1",
                               lambda _: simulated.sites, SitePolicy())
        final["sites"][runtime.name] = {"training_prior": [0.5, 0.5],
                                        "deployment_prior": [0.5, 0.5],
                                        "covariate_score": float(index),
                                        "covariate_flagged": bool(index)}
    scoring = score_shift(final, [t.to_dict() for t in simulated.truths])
    for name in NAMES:
        assert scoring["sites"][name]["covariate_score"] is not None
        assert scoring["sites"][name]["deployment_prior_l1"] is not None
    assert scoring["detection_rate"] == 1.0 and scoring["false_flag_rate"] == 0.0


@pytest.mark.parametrize("name", ["St Mary's", "north/east", "-lead", "x" * 65])
def test_site_names_that_cannot_name_a_site_are_refused_on_load(tmp_path: Path,
                                                                name: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(NAMED.replace("st-marys", name))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert str(path) in message and repr(name) in message
    assert "letters, digits" in message
