"""A deployed site's runtime: its own data, and its own budget over the run config's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.privacy_ledger import LedgerError, PrivacyLedger
from client.site_config import load_site_config
from client.site_runtime import resolve_site
from common.data.splits import POOL, DataFileError, SiteData
from common.federation_config import ConfigError, FederationConfig
from common.privacy_accounting import GaussianRelease
from tests.site_files import site_toml, write_site

# The server's run config asks for a looser budget and clip than the site allows.
RUN = FederationConfig(image_size=16, epsilon=8.0, delta=1e-5, clip=1.0, state_dir="server-state")


@pytest.fixture
def site_node(tmp_path: Path) -> dict:
    config = write_site(tmp_path, site_toml(releases="shift_summaries = false\n"))
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")
    return load_site_config(config).node_config()


def test_deployed_site_reads_its_own_data_and_reports_skips(site_node: dict) -> None:
    site = resolve_site(RUN, site_node, "run-1")
    assert site.name == "test-site"
    assert site.data.images["train"].shape[1:] == (1, 16, 16)
    total = sum(len(site.data.images[s]) for s in ("train", "val", "test"))
    assert total == 40 and len(site.data.images[POOL]) == 3
    assert POOL not in site.data.labels
    assert site.skipped_images == 1
    assert site.policy.label_histograms and not site.policy.non_dp
    assert not site.policy.shift_summaries


def test_site_budget_and_clip_win_over_the_run_config(site_node: dict, tmp_path: Path) -> None:
    site = resolve_site(RUN, site_node, "run-1")
    assert site.ledger is not None
    assert site.ledger.target_epsilon == 1.0 and site.ledger.delta == 1e-5
    assert site.ledger.path == tmp_path / "state" / "ledger.json"  # not under the run's state-dir
    assert site.cfg.clip == 0.05 and site.cfg.epsilon == 1.0
    assert site.cfg.image_size == RUN.image_size


def test_existing_ledger_keeps_its_spend_under_the_sites_budget(site_node: dict,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.json"
    PrivacyLedger(path, 8.0, 1e-5).charge(GaussianRelease(1.0, 0.1, 100), "old", 1, "earlier")
    site = resolve_site(RUN, site_node, "run-2")
    assert site.ledger is not None
    assert site.ledger.target_epsilon == 1.0  # the site's, not the 8.0 the file was written at
    assert site.ledger.epsilon_spent() > 1.0  # so every further release is refused
    with pytest.raises(LedgerError, match="delta=1e-05 but the site is configured with delta"):
        resolve_site(RUN, {**site_node, "delta": 1e-6}, "run-2")


def test_deployed_site_refuses_runs_without_dp(site_node: dict) -> None:
    with pytest.raises(ConfigError, match="turns DP off"):
        resolve_site(RUN.replace(dp=False), site_node, "run-1")


@pytest.mark.parametrize("key", ["ledger-path", "epsilon", "delta"])
def test_deployed_site_must_set_its_own_budget_and_ledger(site_node: dict, key: str) -> None:
    node = {k: v for k, v in site_node.items() if k != key}
    with pytest.raises(ConfigError, match=f"sets data-path but not {key}"):
        resolve_site(RUN, node, "run-1")


def test_channels_must_match_the_run(site_node: dict) -> None:
    with pytest.raises(ConfigError, match=r"1 channels but the run expects .*in-channels=3"):
        resolve_site(RUN.replace(in_channels=3), site_node, "run-1")


def test_simulated_sites_use_partition_id_and_their_datas_name(tmp_path: Path) -> None:
    data = SiteData("sim", {s: torch.zeros(2, 1, 16, 16) for s in ("train", "val", "test")},
                    {s: torch.zeros(2, dtype=torch.long) for s in ("train", "val", "test")}, 2)
    run = RUN.replace(num_sites=1, prevalences=(0.5,), state_dir=str(tmp_path))
    site = resolve_site(run, {"partition-id": 0, "clip": 0.2}, "r", lambda cfg: [data])
    assert site.name == "sim" and site.skipped_images == 0
    assert site.cfg.clip == 0.2 and site.cfg.epsilon == 8.0
    assert site.ledger is not None and site.ledger.path == tmp_path / "ledgers" / "sim.json"
    with pytest.raises(ConfigError, match=r"neither data-path .* nor partition-id"):
        resolve_site(run, {}, "r", lambda cfg: [data])


def test_unreadable_deployed_data_raises_data_file_error(site_node: dict, tmp_path: Path) -> None:
    node = {**site_node, "data-path": str(tmp_path / "nowhere")}
    with pytest.raises(DataFileError, match="nowhere is not a folder"):
        resolve_site(RUN, node, "run-1")
