"""Run a simulated federation end to end and collect its results.

:func:`simulate` starts the ServerApp and one ClientApp per simulated hospital on
Flower's simulation engine, then scores the final global model on every site's
test split and on their union (the simulation holds all data, which a real
federation never does) and gathers each site's privacy spent from its ledger.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.app import make_client_app
from client.privacy_ledger import PARTS, PrivacyLedger
from common.classification_metrics import classification_metrics
from common.federated_data import SiteData, load_federation
from common.federation_config import FederationConfig
from common.medmnist_files import find_medmnist_file, load_medmnist
from common.model_surgery import build_model
from common.prediction import predict_probs
from common.trainable_arrays import load_trainable_arrays
from server.app import make_server_app
from server.run_records import (
    FINAL_ARRAYS_FILE,
    HISTORY_FILE,
    SHIFT_FILE,
    load_arrays,
    write_json,
)
from server.run_report import RESULTS_FILE, write_report
from server.strategy import RoundCallback
from simulations.scenario import SiteTruth, build_sites, load_scenario
from simulations.shift_scoring import score_shift

logger = logging.getLogger(__name__)

TEST_METRICS = ("accuracy", "balanced_accuracy", "auroc")


def _backend_config(cfg: FederationConfig) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    per_client = 1 if cores < 2 * cfg.num_sites else max(1, cores // cfg.num_sites)
    gpus = 1.0 / cfg.num_sites if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": per_client, "num_gpus": gpus},
        "init_args": {"num_cpus": cores, "logging_level": "ERROR", "log_to_driver": False,
                      "include_dashboard": False},
    }


@dataclass(frozen=True)
class SimulatedSites:
    """The simulated sites of a run and, for scenario runs, their ground truth."""

    sites: tuple[SiteData, ...]
    truths: tuple[SiteTruth, ...] = ()


def scenario_config(cfg: FederationConfig) -> FederationConfig:
    """``cfg`` with the scenario file's federation settings and site count applied."""
    if not cfg.scenario:
        return cfg
    scenario = load_scenario(cfg.scenario)
    overrides = {k.replace("-", "_"): v for k, v in scenario.federation.items()}
    return cfg.replace(
        **overrides, dataset=scenario.dataset, num_sites=len(scenario.sites),
        prevalences=tuple(s.prevalence for s in scenario.sites),
    )


@functools.lru_cache(maxsize=2)
def simulated_sites(cfg: FederationConfig) -> SimulatedSites:
    """The sites of ``cfg``: its scenario's, or split by its prevalences."""
    if not cfg.scenario:
        return SimulatedSites(load_federation(cfg))
    scenario = load_scenario(cfg.scenario)
    splits = load_medmnist(find_medmnist_file(scenario.dataset, cfg.data_dir or None))
    sites, truths = build_sites(scenario, splits, cfg.image_size)
    return SimulatedSites(sites, truths)


def _site_results(cfg: FederationConfig, history: dict[str, Any]) -> list[dict[str, Any]]:
    last_eval: dict[str, dict] = {}
    for entry in history["rounds"]:
        for name, phases in entry["sites"].items():
            if "evaluate" in phases:
                last_eval[name] = phases["evaluate"]
    sites = []
    for site in simulated_sites(cfg).sites:
        row: dict[str, Any] = {"name": site.name, "epsilon_spent": None, "delta": None,
                               "noise_multiplier": None, "sample_rate": None, "steps": 0}
        ledger_path = Path(cfg.state_dir) / "ledgers" / f"{site.name}.json"
        if cfg.dp and ledger_path.exists():
            ledger = PrivacyLedger(ledger_path, cfg.epsilon, cfg.delta)
            sgd = [e for e in ledger.entries()
                   if e["kind"] == "gaussian" and e.get("mechanism", "dp-sgd") == "dp-sgd"]
            row.update({
                "epsilon_spent": ledger.epsilon_spent(), "delta": ledger.delta,
                "epsilon_by_part": {p: ledger.epsilon_spent(p) for p in PARTS},
                "noise_multiplier": sgd[-1]["noise_multiplier"] if sgd else None,
                "sample_rate": sgd[-1]["sample_rate"] if sgd else None,
                "steps": sum(e["steps"] for e in sgd),
                "ledger": str(ledger_path),
            })
        evaluated = last_eval.get(site.name, {})
        row["test"] = {k: evaluated.get(k) for k in (*TEST_METRICS, "loss")}
        row["train_size"] = len(site.labels["train"])
        row["test_size"] = len(site.labels["test"])
        row["prevalence"] = float(site.labels["train"].float().mean())
        sites.append(row)
    return sites


def _pooled_test(cfg: FederationConfig) -> dict[str, float]:
    model = build_model(cfg.model_spec())
    load_trainable_arrays(model, load_arrays(Path(cfg.state_dir) / FINAL_ARRAYS_FILE))
    sites = simulated_sites(cfg).sites
    images = torch.cat([s.images["test"] for s in sites])
    labels = torch.cat([s.labels["test"] for s in sites]).numpy()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = classification_metrics(labels, predict_probs(model, images, device))
    return {k: metrics[k] for k in (*TEST_METRICS, "loss")}


def simulate(cfg: FederationConfig, out_dir: Path | None = None,
             on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the federation ``cfg`` describes; return (and write to ``out_dir``) its results.

    ``cfg.state_dir`` receives the server's history, final parameters and the
    simulated sites' ledgers; it should be a fresh directory per run (ledgers
    there carry privacy spent over from earlier runs).
    """
    cfg = scenario_config(cfg)
    find_medmnist_file(cfg.dataset, cfg.data_dir or None)
    simulated = simulated_sites(cfg)
    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(
            server_app=make_server_app(cfg, on_round),
            client_app=make_client_app(cfg, lambda _: simulated.sites),
            num_supernodes=cfg.num_sites,
            backend_config=_backend_config(cfg),
        )
    history_path = Path(cfg.state_dir) / HISTORY_FILE
    if not history_path.exists():
        raise RuntimeError(
            f"the simulation ended without writing {history_path}; see the log above"
        )
    history = json.loads(history_path.read_text())
    results = {
        "config": cfg.to_flower(),
        "sites": _site_results(cfg, history),
        "pooled_test": _pooled_test(cfg),
        "rounds": history["rounds"],
        "bytes_per_round_per_site": history["bytes_per_round_per_site"],
        "full_model_bytes": history["full_model_bytes"],
        "trainable_parameters": history["trainable_parameters"],
    }
    results["bytes_fraction_of_full_model"] = (
        results["bytes_per_round_per_site"] / results["full_model_bytes"]
    )
    shift_path = Path(cfg.state_dir) / SHIFT_FILE
    if shift_path.exists():
        shift = json.loads(shift_path.read_text())
        if simulated.truths:
            shift["scoring"] = score_shift(shift["final"], [t.to_dict() for t in simulated.truths])
        results["shift"] = shift
    if out_dir is not None:
        write_json(Path(out_dir) / RESULTS_FILE, results)
        if "shift" in results:
            write_report(results, Path(out_dir))
    return results


def progress_callback(total_rounds: int) -> tuple[RoundCallback, Callable[[], None]]:
    """A tqdm progress bar over rounds, as a round callback and a closer."""
    from tqdm import tqdm

    bar = tqdm(total=total_rounds, desc="rounds", unit="round")

    def on_round(entry: dict[str, Any]) -> None:
        auroc = entry["evaluate"].get("auroc")
        bar.set_postfix(auroc=f"{auroc:.3f}" if isinstance(auroc, float) else "n/a",
                        refused=len(entry["refused"]))
        bar.update(1)

    return on_round, bar.close
