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
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.app import make_client_app
from client.own_model import decision_model, own_model
from client.privacy_ledger import PARTS, PrivacyLedger
from client.release_policy import SitePolicy
from client.site_runtime import resolve_device, resolve_site, simulated_ledger_path
from client.site_work import site_model
from common.atomic_files import load_arrays
from common.classification_metrics import classification_metrics
from common.data.datasets import load_image_dataset
from common.data.federation import load_federation
from common.data.splits import SiteData
from common.federation_config import FederationConfig
from common.model_blend import BlendedModel
from common.model_surgery import FedShiftModel
from common.prediction import CalibratedPredictions, calibrated_predictions
from common.privacy_accounting import GaussianRelease, certify
from server.app import make_server_app
from server.phase_progress import PhaseCallback
from server.run_records import (
    FINAL_ARRAYS_FILE,
    HISTORY_FILE,
    SHIFT_FILE,
    write_json,
)
from server.run_report import RESULTS_FILE
from server.strategy import RoundCallback
from simulations.scenario import SiteTruth, build_sites, load_scenario
from simulations.shift_scoring import score_shift
from simulations.simulation_report import write_simulation_report

logger = logging.getLogger(__name__)

TEST_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auroc", "loss")


def backend_config(cfg: FederationConfig) -> dict[str, Any]:
    """Ray resources for the simulation: CPU (and GPU share) per site, and Ray start-up."""
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
    splits = load_image_dataset(scenario.dataset, cfg.data_dir or None, cfg.seed,
                                cfg.image_size)
    sites, truths = build_sites(scenario, splits, cfg.image_size)
    return SimulatedSites(sites, truths)


SiteModel = Callable[[SiteData], FedShiftModel]


def _scored(sites: tuple[SiteData, ...], model_for: SiteModel
            ) -> dict[str, CalibratedPredictions]:
    """Each site's test predictions as the site makes them: its model calibrated, and
    decided at its balanced operating point, on its own validation split."""
    device = resolve_device("auto")
    logger.info("scoring each site's final model on its test split (%d sites)", len(sites))
    start = time.perf_counter()
    scored = {site.name: calibrated_predictions(model_for(site), site.images["val"],
                                                site.labels["val"], site.images["test"], device)
              for site in sites}
    logger.info("scored the %d sites in %.1f s", len(sites), time.perf_counter() - start)
    return scored


def _site_results(cfg: FederationConfig, sites: tuple[SiteData, ...],
                  scored: dict[str, CalibratedPredictions]) -> list[dict[str, Any]]:
    """Per site: its privacy figures from its ledger, and its test metrics scored here.

    The simulation holds every site's data, so it scores each site's model on the
    site's test split exactly (the ground truth), at the site's own operating
    point; what the sites release to the server is DP and charged, and goes to the
    history.
    """
    rows = []
    for site in sites:
        row: dict[str, Any] = {"name": site.name, "epsilon_spent": None, "delta": None,
                               "noise_multiplier": None, "sample_rate": None, "steps": 0}
        ledger_path = simulated_ledger_path(cfg, site.name)
        if cfg.dp and ledger_path.exists():
            row.update(ledger_figures(ledger_path, cfg))
        own = scored[site.name]
        row["test"] = _metrics(site.labels["test"], own)
        row["operating_point"] = own.point.to_dict()
        row["train_size"] = len(site.labels["train"])
        row["test_size"] = len(site.labels["test"])
        row["class_prior"] = torch.bincount(site.labels["train"], minlength=site.num_classes
                                            ).div(max(len(site.labels["train"]), 1)).tolist()
        row["prevalence"] = row["class_prior"][1] if site.num_classes == 2 else None
        rows.append(row)
    return rows


def epsilon_by_release(ledger: PrivacyLedger) -> list[dict[str, Any]]:
    """Each kind of DP release in ``ledger`` (mechanism and part read), with how many
    there were and the epsilon they certify alone, in the order first made."""
    kinds: dict[tuple[str, str], list[GaussianRelease]] = {}
    for entry in ledger.entries():
        if entry.kind == "gaussian":
            kinds.setdefault((entry.mechanism, entry.part), []).append(entry.release)
    return [{"mechanism": mechanism, "part": part, "count": len(releases),
             "epsilon": certify(releases, ledger.delta).epsilon}
            for (mechanism, part), releases in kinds.items()]


def ledger_figures(ledger_path: Path, cfg: FederationConfig) -> dict[str, Any]:
    """A ledger's privacy spent, by part and by kind of release, and its DP-SGD
    parameters, as results report them."""
    ledger = PrivacyLedger(ledger_path, cfg.epsilon, cfg.delta)
    sgd = [e for e in ledger.entries() if e.kind == "gaussian" and e.mechanism == "dp-sgd"]
    spent = ledger.certificate()
    return {
        "epsilon_spent": spent.epsilon, "delta": ledger.delta,
        "accountant": spent.accountant, "epsilon_prv": spent.prv_epsilon,
        "epsilon_rdp": spent.rdp_epsilon,
        "epsilon_by_part": {p: ledger.epsilon_spent(p) for p in PARTS},
        "epsilon_by_release": epsilon_by_release(ledger),
        "composition": ledger.composition,
        "noise_multiplier": sgd[-1].noise_multiplier if sgd else None,
        "sample_rate": sgd[-1].sample_rate if sgd else None,
        "steps": sum(e.steps for e in sgd),
        "ledger": str(ledger_path),
    }


def pooled_test(sites: tuple[SiteData, ...], scored: dict[str, CalibratedPredictions]
                ) -> dict[str, float]:
    """Metrics over the union of the sites' test splits, each scored as its site scores it."""
    labels = np.concatenate([s.labels["test"].numpy() for s in sites])
    probs = np.concatenate([scored[s.name].probs for s in sites])
    decisions = np.concatenate([scored[s.name].decisions for s in sites])
    metrics = classification_metrics(labels, probs, decisions)
    return {k: metrics[k] for k in TEST_METRICS if k in metrics}


def _final_model_for(cfg: FederationConfig, sites: tuple[SiteData, ...]) -> SiteModel:
    """The final global model as each site uses it (:func:`client.site_work.site_model`):
    with its own scale/shift under personal-bn and its own adapted statistics."""
    final = load_arrays(Path(cfg.state_dir) / FINAL_ARRAYS_FILE)
    run_key = json.loads((Path(cfg.state_dir) / HISTORY_FILE).read_text())["run_key"]
    index = {s.name: i for i, s in enumerate(sites)}

    def model_for(site: SiteData) -> FedShiftModel:
        runtime = resolve_site(cfg, {"partition-id": index[site.name]}, run_key,
                               lambda _: sites)
        return site_model(runtime, final)

    return model_for


def _metrics(labels: torch.Tensor, scored: CalibratedPredictions) -> dict[str, float]:
    metrics = classification_metrics(labels.numpy(), scored.probs, scored.decisions)
    return {k: metrics[k] for k in TEST_METRICS if k in metrics}


def _test_predictions(model: nn.Module, site: SiteData, device: torch.device,
                      policy: SitePolicy) -> CalibratedPredictions:
    return calibrated_predictions(model, site.images["val"], site.labels["val"],
                                  site.images["test"], device, policy.target_sensitivity)


def add_own_models(results: dict[str, Any], cfg: FederationConfig,
                   sites: tuple[SiteData, ...], policy: SitePolicy) -> None:
    """Add to ``results`` what each site found comparing the final federated model with
    its own model (:mod:`client.own_model`; kept from the run's evaluation, or trained
    now): per site, the comparison on its validation split, the test metrics of its own
    model alone and of the mix chosen on validation, and whether it decides with that
    mix; and the pooled test with every site on its mix. Nothing is added where the
    policy keeps no own model."""
    if not policy.own_model_epochs:
        return
    final = load_arrays(Path(cfg.state_dir) / FINAL_ARRAYS_FILE)
    run_key = json.loads((Path(cfg.state_dir) / HISTORY_FILE).read_text())["run_key"]
    mixed: dict[str, CalibratedPredictions] = {}
    rows = {row["name"]: row for row in results["sites"]}
    for index, data in enumerate(sites):
        runtime = resolve_site(cfg, {"partition-id": index}, run_key, lambda _: sites, policy)
        federated = site_model(runtime, final)
        _, choice = decision_model(runtime, federated)
        if choice is None:
            continue
        own = own_model(runtime)
        mixed[data.name] = _test_predictions(BlendedModel(federated, own, choice.weight),
                                             data, runtime.device, policy)
        alone = _test_predictions(own, data, runtime.device, policy)
        rows[data.name]["own_model"] = {
            **choice.to_dict(), "epochs": policy.own_model_epochs,
            "decides_with_mix": policy.decide_with_mix,
            "test_alone": _metrics(data.labels["test"], alone),
            "test_mix": _metrics(data.labels["test"], mixed[data.name]),
        }
    if len(mixed) == len(sites):
        results["pooled_test_mix"] = pooled_test(sites, mixed)


def collect_results(cfg: FederationConfig, history: dict[str, Any],
                    sites: tuple[SiteData, ...], model_for: SiteModel) -> dict[str, Any]:
    """A run's results: settings, per-site figures, pooled test metrics and history."""
    scored = _scored(sites, model_for)
    results = {
        "config": cfg.to_flower(),
        "sites": _site_results(cfg, sites, scored),
        "pooled_test": pooled_test(sites, scored),
        "rounds": history["rounds"],
        "bytes_per_round_per_site": history["bytes_per_round_per_site"],
        "full_model_bytes": history["full_model_bytes"],
        "trainable_parameters": history["trainable_parameters"],
    }
    sent = results["bytes_per_round_per_site"]
    results["bytes_fraction_of_full_model"] = (
        None if sent is None else sent / results["full_model_bytes"]
    )
    return results


def simulated_policy(cfg: FederationConfig) -> SitePolicy:
    """What simulated sites release: a deployed site's defaults, plus their compute time
    (for the benchmarks) and metrics on their deployment pools' audit labels (which only
    simulations have); they answer the run's ``evaluations``."""
    return SitePolicy(non_dp=frozenset({"timing", "audit-metrics"}),
                      max_evaluations=cfg.evaluations)


def simulate(cfg: FederationConfig, out_dir: Path | None = None,
             on_round: RoundCallback | None = None,
             simulated: SimulatedSites | None = None,
             policy: SitePolicy | None = None,
             on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Run the federation ``cfg`` describes; return (and write to ``out_dir``) its results.

    ``cfg.state_dir`` receives the server's history, final parameters and the
    simulated sites' ledgers; it should be a fresh directory per run (ledgers
    there carry privacy spent over from earlier runs). ``simulated`` replaces the
    sites ``cfg`` would build (studies pass sites with injected shifts); ``policy``
    is every simulated site's release policy (None: :func:`simulated_policy`).
    ``on_round`` and ``on_phase`` are the server's progress callbacks
    (:func:`server.app.run_federation`).
    """
    cfg = scenario_config(cfg)
    policy = policy or simulated_policy(cfg)
    if simulated is None:
        logger.info("preparing the data of %d sites (%s at %d px)", cfg.num_sites, cfg.dataset,
                    cfg.image_size)
        start = time.perf_counter()
        simulated = simulated_sites(cfg)
        logger.info("the sites' data is ready (%.1f s)", time.perf_counter() - start)
    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(
            server_app=make_server_app(cfg, on_round, on_phase),
            client_app=make_client_app(cfg, lambda _: simulated.sites,
                                       policy),
            num_supernodes=cfg.num_sites,
            backend_config=backend_config(cfg),
        )
    history_path = Path(cfg.state_dir) / HISTORY_FILE
    if not history_path.exists():
        raise RuntimeError(
            f"the simulation ended without writing {history_path}; see the log above"
        )
    history = json.loads(history_path.read_text())
    results = collect_results(cfg, history, simulated.sites,
                              _final_model_for(cfg, simulated.sites))
    add_own_models(results, cfg, simulated.sites, policy)
    shift_path = Path(cfg.state_dir) / SHIFT_FILE
    if shift_path.exists():
        shift = json.loads(shift_path.read_text())
        if simulated.truths:
            shift["scoring"] = score_shift(shift["final"], [t.to_dict() for t in simulated.truths])
        results["shift"] = shift
    if out_dir is not None:
        write_json(Path(out_dir) / RESULTS_FILE, results)
        write_simulation_report(results, Path(out_dir))
    return results

