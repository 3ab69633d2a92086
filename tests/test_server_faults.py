"""The server goes on without sites that do not answer, and takes them back when they do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.atomic_files import load_arrays
from common.federation_config import FederationConfig
from server.aggregators import AggregatorError
from server.app import run_federation
from server.run_records import FINAL_ARRAYS_FILE, HISTORY_FILE
from tests.fake_grids import CONFUSION, STEP, TrainingGrid

pytestmark = pytest.mark.usefixtures("server_identity")


def _cfg(tmp_path: Path, min_sites: int, evaluations: int = 3) -> FederationConfig:
    return FederationConfig(num_sites=2, prevalences=(0.5, 0.5), num_rounds=3, dp=False,
                            shift=False, min_sites=min_sites, state_dir=str(tmp_path),
                            evaluations=evaluations)


def _run(tmp_path: Path, grid: TrainingGrid, min_sites: int, evaluations: int = 3
         ) -> tuple[dict, np.ndarray]:
    run_federation(grid, _cfg(tmp_path, min_sites, evaluations))
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    final = load_arrays(tmp_path / FINAL_ARRAYS_FILE)
    return history, np.concatenate([a.numpy().ravel() for a in final.values()])


def test_a_dead_site_is_logged_missing_and_taken_back_when_it_returns(tmp_path: Path) -> None:
    history, with_gap = _run(tmp_path / "a", TrainingGrid(silent={2: {3}}), min_sites=1)
    _, full = _run(tmp_path / "b", TrainingGrid(), min_sites=1)
    rounds = history["rounds"]
    assert rounds[1]["missing"] == {"train": ["site-3"], "evaluate": ["site-3"]}
    assert rounds[0]["missing"] == {} and rounds[2]["missing"] == {}
    assert set(rounds[1]["sites"]) == {"site-2"}
    assert set(rounds[2]["sites"]) == {"site-2", "site-3"}
    # Round 2 aggregated site-2's step alone; rounds 1 and 3 the mean of both.
    np.testing.assert_allclose(full - with_gap, (STEP[2] + STEP[3]) / 2 - STEP[2], atol=1e-6)


def test_a_node_the_superlink_reports_unavailable_is_named_and_missing(tmp_path: Path) -> None:
    history, _ = _run(tmp_path, TrainingGrid(unavailable={2: {3}}), min_sites=1)
    second = history["rounds"][1]
    assert second["refused"] == {"site-3 (train)": "Node Unavailable",
                                 "site-3 (evaluate)": "Node Unavailable"}
    assert second["missing"] == {"train": ["site-3"], "evaluate": ["site-3"]}
    assert set(second["sites"]) == {"site-2"}


def test_below_min_sites_the_global_parameters_are_kept(tmp_path: Path) -> None:
    history, with_gap = _run(tmp_path / "a", TrainingGrid(silent={2: {3}}), min_sites=2)
    _, full = _run(tmp_path / "b", TrainingGrid(), min_sites=2)
    assert history["rounds"][1]["missing"]["train"] == ["site-3"]
    # Round 2 aggregated nothing: one round's mean step fewer than the full run.
    np.testing.assert_allclose(full - with_gap, (STEP[2] + STEP[3]) / 2, atol=1e-6)


def test_only_the_last_evaluations_rounds_evaluate_from_the_summed_confusion_counts(
        tmp_path: Path) -> None:
    grid = TrainingGrid()
    history, _ = _run(tmp_path, grid, min_sites=1, evaluations=1)
    rounds = history["rounds"]
    assert [r["evaluate"] != {} for r in rounds] == [False, False, True]
    assert {c["server-round"] for c in grid.configs[-2:]} == {3}
    assert all("evaluate" not in site for r in rounds[:2] for site in r["sites"].values())
    pooled = rounds[2]["evaluate"]
    total = CONFUSION[2] + CONFUSION[3]
    assert pooled["accuracy"] == pytest.approx(np.trace(total) / total.sum())
    assert pooled["balanced_accuracy"] == pytest.approx((13 / 20 + 19 / 20) / 2)
    assert pooled["sites"] == 2 and pooled["noise_std"] == 0.0
    assert rounds[2]["sites"]["site-3"]["evaluate"]["balanced_accuracy"] == pytest.approx(0.75)
    assert rounds[2]["sites"]["site-2"]["node"] == 2
    assert rounds[0]["train"] == {"compute-seconds": 0.5}


def test_an_unknown_aggregator_stops_the_run_before_any_site_is_asked(tmp_path: Path) -> None:
    grid = TrainingGrid()
    with pytest.raises(AggregatorError, match=r"unknown aggregator 'median'; choose one of: .*"
                       "fedmedian"):
        run_federation(grid, _cfg(tmp_path, min_sites=1).replace(aggregator="median"))
    assert grid.pushed == 0
