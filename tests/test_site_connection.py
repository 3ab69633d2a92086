"""The server waits a bounded time for its sites, then stops and says what to change."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from common.federation_config import FederationConfig
from server import site_connection
from server.app import run_federation
from server.run_records import HISTORY_FILE
from server.site_connection import SitesNotConnected
from tests.fake_grids import LateGrid, TrainingGrid

pytestmark = pytest.mark.usefixtures("server_identity")


def _cfg(tmp_path: Path, **changes: object) -> FederationConfig:
    settings: dict[str, object] = {"num_sites": 2, "prevalences": (0.5, 0.5), "num_rounds": 1,
                                   "dp": False, "shift": False, "state_dir": str(tmp_path),
                                   "connect_timeout": 0.3}
    settings.update(changes)
    return FederationConfig(**settings)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_connection, "POLL_SECONDS", 0.02)


def test_too_few_nodes_stop_the_run_after_connect_timeout_with_the_ways_out(
        tmp_path: Path) -> None:
    # flwr >= 1.32's new local federation: 2 SuperNodes for a run of 4 sites.
    grid = TrainingGrid()
    cfg = _cfg(tmp_path, num_sites=4, prevalences=(0.4, 0.6, 0.75, 0.9))
    start = time.monotonic()
    with pytest.raises(SitesNotConnected) as stopped:
        run_federation(grid, cfg)
    assert time.monotonic() - start >= cfg.connect_timeout
    assert grid.pushed == 0  # no site was asked for anything
    assert not (tmp_path / HISTORY_FILE).exists()
    assert str(stopped.value) == (
        "2 node(s) connected, but this run needs 4 (num-sites = 4, min-sites = 0); gave up "
        "after waiting connect-timeout = 0.3 s. Either size the federation to 4 nodes (a "
        'local simulation: flwr run . --federation-config "num-supernodes=4", since a new '
        "local federation simulates 2; a deployment: start more SuperNodes), or need fewer "
        'sites (--run-config "min-sites=2"; num-sites = N needs N prevalences in a '
        "simulation). Raise connect-timeout if the nodes are still starting.")


def test_min_sites_is_what_the_wait_needs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_sites=4, prevalences=(0.4, 0.6, 0.75, 0.9), min_sites=2)
    run_federation(TrainingGrid(), cfg)
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert set(history["rounds"][0]["sites"]) == {"site-2", "site-3"}


def test_with_no_node_at_all_the_message_still_says_what_to_lower(tmp_path: Path) -> None:
    grid = LateGrid(absent_polls=None)
    with pytest.raises(SitesNotConnected, match=r"^0 node\(s\) connected, but this run needs 2.*"
                                                r"need fewer sites \(a smaller min-sites or "
                                                r"num-sites;"):
        run_federation(grid, _cfg(tmp_path))
    assert grid.polls > 1  # it polled until the deadline, not once


def test_sites_that_connect_within_the_timeout_are_waited_for(tmp_path: Path) -> None:
    grid = LateGrid(absent_polls=3)
    run_federation(grid, _cfg(tmp_path, connect_timeout=30.0))
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert set(history["rounds"][0]["sites"]) == {"site-2", "site-3"}
    assert grid.polls > 3
