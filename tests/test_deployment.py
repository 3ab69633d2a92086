"""Real deployment on loopback: SuperLink and SuperNodes as processes, TLS and authentication.

One SuperLink and three SuperNodes (started by ``fedshift site run`` from site
files) run a DP federation; a fourth SuperNode with an unregistered key is
refused; a site is killed during round 2, which goes on without it; the SuperLink
(with the ServerApp it runs) is killed during round 3; both come back and the
run is resumed from the server's checkpoint under the same run key, with the
site back. Every process started is killed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.privacy_ledger import PrivacyLedger
from common.atomic_files import load_arrays
from common.federation_config import FederationConfig
from server.checkpoint import CHECKPOINT_FILE, config_fingerprint, load_checkpoint
from server.run_records import FINAL_ARRAYS_FILE, HISTORY_FILE
from tests.loopback_federation import LoopbackFederation, free_port, wait_for
from tests.site_files import write_medmnist_slice

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-0", "site-1", "site-2"]
ROUNDS = 3
SIZES = {"train": 48, "val": 24, "test": 24}


def _site_config(federation: LoopbackFederation, site: str, source: Path, folder: Path,
                 seed: int) -> Path:
    """The site's TOML file, as a hospital writes it."""
    data = write_medmnist_slice(source, folder / "data.npz", SIZES, seed)
    key = federation.creds.site_keys[site][0]
    path = folder / "site.toml"
    path.write_text(f"""name = "{site}"
device = "cpu"

[data]
path = "{data}"
format = "medmnist"

[privacy]
epsilon = 1.0
delta = 1e-5
clip = 0.1
ledger = "ledger.json"

[operating_point]
own_model_epochs = 0

[superlink]
address = "127.0.0.1:{federation.port}"
ca_certificate = "{federation.creds.ca_certificate}"
private_key = "{key}"
clientapp_port = {free_port()}
""")
    return path


def _run_config(state: Path) -> dict[str, object]:
    return {"num-sites": 3, "prevalences": "0.5,0.5,0.5", "min-sites": 2, "num-rounds": ROUNDS,
            "image-size": 32, "local-epochs": 1, "batch-size": 16, "shift": False,
            "round-timeout": 600.0, "state-dir": str(state)}


def _run_config_arg(settings: dict[str, object]) -> str:
    """``--run-config`` text: space-separated ``key=value`` in TOML syntax."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def _checkpoint_round(state: Path, fingerprint: str) -> int:
    saved = load_checkpoint(state / CHECKPOINT_FILE, fingerprint)
    return saved.server_round if saved is not None else 0


@pytest.fixture
def federation(tmp_path: Path) -> LoopbackFederation:
    fed = LoopbackFederation(tmp_path, SITES)
    yield fed
    fed.close()


def test_three_sites_over_tls_survive_a_dead_site_and_a_server_crash(
        federation: LoopbackFederation, pneumonia_npz: Path, tmp_path: Path) -> None:
    state = tmp_path / "server-state"
    settings = _run_config(state)
    run_config = _run_config_arg(settings)
    fingerprint = config_fingerprint(FederationConfig.from_flower(settings).to_flower())

    federation.start_superlink()
    for site in SITES:
        federation.register(site)
    configs = {site: _site_config(federation, site, pneumonia_npz, tmp_path / site, i)
               for i, site in enumerate(SITES)}

    def start(site: str):
        return federation.start_supernode(site, ["fedshift", "site", "run", str(configs[site])])

    nodes = {site: start(site) for site in SITES}
    wait_for(lambda: federation.online_nodes() == 3, 120, "three SuperNodes online")

    intruder = federation.start_supernode("intruder", federation.supernode_argv(
        "intruder", 'site-name="intruder"', free_port(), ["--max-retries", "1"]))
    wait_for(lambda: not intruder.alive(), 120, "the unregistered SuperNode to give up")
    assert intruder.popen.returncode != 0
    assert "Failed to activate SuperNode" in intruder.text()
    assert federation.online_nodes() == 3

    federation.run(REPO, run_config)
    wait_for(lambda: _checkpoint_round(state, fingerprint) >= 1, 600, "round 1's checkpoint")
    federation.kill(nodes["site-2"])  # dies during round 2
    wait_for(lambda: _checkpoint_round(state, fingerprint) >= 2, 600,
             "round 2 without site-2")
    link = next(p for p in federation.processes if p.name == "superlink")
    federation.kill(link)  # the server dies during round 3, with the ServerApp it runs
    assert _checkpoint_round(state, fingerprint) == 2, federation.logs()

    nodes["site-2"] = start("site-2")
    federation.start_superlink()
    wait_for(lambda: federation.online_nodes() == 3, 300, "the SuperNodes to reconnect")
    resumed = federation.run(REPO, run_config)
    wait_for(lambda: federation.run_status(resumed).startswith("finished"), 900,
             "the resumed run to finish")
    assert federation.run_status(resumed) == "finished:completed", federation.logs()

    history = json.loads((state / HISTORY_FILE).read_text())
    saved = load_checkpoint(state / CHECKPOINT_FILE, fingerprint)
    assert saved is not None and saved.server_round == ROUNDS
    assert history["run_key"] == saved.run_key
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert set(rounds[0]["sites"]) == set(SITES), rounds[0]
    assert rounds[1]["missing"]["train"] == ["site-2"], rounds[1]
    assert set(rounds[1]["sites"]) == {"site-0", "site-1"}, rounds[1]
    assert set(rounds[2]["sites"]) == set(SITES), rounds[2]  # site-2 is back
    assert all(np.isfinite(a.numpy()).all() for a in load_arrays(state / FINAL_ARRAYS_FILE)
               .values())
    for site in SITES:
        ledger = PrivacyLedger(tmp_path / site / "ledger.json", 1.0, 1e-5)
        assert {e.run for e in ledger.entries()} == {saved.run_key}
        assert ledger.epsilon_spent() <= 1.0 + 1e-9
