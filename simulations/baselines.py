"""Baselines that need no federation: every site alone, and all data in one place.

Both train with the sites' own code path (:func:`client.site_work.train_site`,
so the same model, learning-rate schedule, noise plan and privacy ledger as a
federated site) for ``num_rounds`` rounds of ``local_epochs`` epochs, and write
the same results as :func:`simulations.runner.simulate`:

- **local-only**: each site trains on its own data at its own budget and is
  scored on its own test split; nothing is sent (0 bytes per round).
- **centralised**: the sites' training splits pooled at one holder that trains
  under one budget (or without DP), scored on every site's test split. It is
  the upper bound a federation tries to reach; its data movement is the data
  itself, so bytes per round are reported as ``None``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from client.privacy_ledger import PrivacyLedger
from client.site_runtime import SiteRuntime, resolve_device, resolve_site, simulated_ledger_path
from client.site_work import site_model, train_site
from common.atomic_files import save_arrays
from common.data.splits import SiteData
from common.federation_config import FederationConfig
from common.messages import Request
from common.model_surgery import FedShiftModel, build_model
from common.trainable_arrays import full_model_bytes, trainable_arrays
from server.run_records import FINAL_ARRAYS_FILE, write_json
from server.run_report import RESULTS_FILE
from simulations.runner import collect_results, ledger_figures

POOLED = "pooled"
LOCAL_DIR = "local"


def alone(cfg: FederationConfig) -> FederationConfig:
    """``cfg`` for a holder that trains alone: no federated evaluation or shift summaries,
    so its plan reserves nothing for them and all its budget goes to training."""
    return cfg.replace(shift=False, evaluations=0)


def train_alone(site: SiteRuntime) -> ArrayRecord:
    """Train from the pretrained model for the run's rounds; the final parameters."""
    arrays = trainable_arrays(build_model(site.cfg.model_spec()))
    for server_round in range(1, site.cfg.num_rounds + 1):
        arrays = train_site(site, arrays, Request(server_round, site.run_key)).arrays
    return arrays


def _history(cfg: FederationConfig, run_key: str, bytes_per_round: int | None
             ) -> dict[str, Any]:
    model = build_model(cfg.model_spec())
    return {
        "run_key": run_key,
        "rounds": [],
        "bytes_per_round_per_site": bytes_per_round,
        "full_model_bytes": full_model_bytes(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _written(results: dict[str, Any], out_dir: Path | None) -> dict[str, Any]:
    if out_dir is not None:
        write_json(Path(out_dir) / RESULTS_FILE, results)
    return results


def run_local_only(cfg: FederationConfig, sites: tuple[SiteData, ...],
                   out_dir: Path | None = None) -> dict[str, Any]:
    """Every site trains alone at its own budget; its model is scored on its own test split.

    Each site's final parameters go to ``state_dir/local/<site>.npz`` and its
    ledger to ``state_dir/ledgers/<site>.json``, as in a federated run.
    """
    run_key = uuid.uuid4().hex
    models: dict[str, FedShiftModel] = {}
    for index, data in enumerate(sites):
        site = resolve_site(alone(cfg), {"partition-id": index}, run_key, lambda _: sites)
        arrays = train_alone(site)
        save_arrays(Path(cfg.state_dir) / LOCAL_DIR / f"{data.name}.npz", arrays)
        models[data.name] = site_model(site, arrays)
    results = collect_results(cfg, _history(cfg, run_key, 0), sites,
                              lambda site: models[site.name])
    return _written(results, out_dir)


def pool_sites(sites: tuple[SiteData, ...]) -> SiteData:
    """One data holder with every site's splits concatenated."""
    return SiteData(
        name=POOLED,
        images={s: torch.cat([site.images[s] for site in sites]) for s in sites[0].images},
        labels={s: torch.cat([site.labels[s] for site in sites]) for s in sites[0].labels},
        num_classes=sites[0].num_classes,
    )


def run_centralised(cfg: FederationConfig, sites: tuple[SiteData, ...],
                    out_dir: Path | None = None) -> dict[str, Any]:
    """The sites' data pooled at one holder, trained under one budget (or without DP).

    The pooled holder's ledger is ``state_dir/ledgers/pooled.json``; every site's
    row reports it, since each site's records are in the pooled data at that budget.
    """
    run_key = uuid.uuid4().hex
    pooled = pool_sites(sites)
    ledger_path = simulated_ledger_path(cfg, POOLED)
    device = resolve_device("auto")
    holder = SiteRuntime(
        name=POOLED, cfg=alone(cfg), data=pooled,
        ledger=PrivacyLedger(ledger_path, cfg.epsilon, cfg.delta) if cfg.dp else None,
        device=device, run_key=run_key,
    )
    arrays = train_alone(holder)
    save_arrays(Path(cfg.state_dir) / FINAL_ARRAYS_FILE, arrays)
    model = site_model(holder, arrays)
    results = collect_results(cfg, _history(cfg, run_key, None), sites,
                              lambda _: model)
    if cfg.dp:
        figures = ledger_figures(ledger_path, cfg)
        for row in results["sites"]:
            row.update(figures)
    return _written(results, out_dir)
