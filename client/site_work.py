"""What a site does for a train or evaluate message, Flower aside."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord

from client.local_training import (
    LocalTrainingConfig,
    poisson_sample_rate,
    steps_per_round,
    train_locally,
)
from client.personal_params import apply_personal, personal_path, save_personal
from client.privacy_ledger import BudgetExceeded, NoisePlan
from client.site_runtime import SiteRuntime
from common.classification_metrics import classification_metrics
from common.federation_config import ConfigError
from common.model_surgery import FedShiftModel, build_model
from common.prediction import predict_probs
from common.privacy_accounting import GaussianRelease, noise_for_budget
from common.private_summaries import class_sums_release
from common.trainable_arrays import load_trainable_arrays, trainable_arrays

logger = logging.getLogger(__name__)


def _personal_path(site: SiteRuntime) -> Path:
    site_dir = site.ledger.path.parent if site.ledger is not None else Path(site.cfg.state_dir)
    return personal_path(site_dir, site.name, site.run_key)


def site_model(site: SiteRuntime, arrays: ArrayRecord) -> FedShiftModel:
    """The global model as this site uses it: with its own scale/shift under personal-bn."""
    model = build_model(site.cfg.model_spec())
    load_trainable_arrays(model, arrays)
    if site.cfg.personal_bn:
        apply_personal(model, _personal_path(site))
    return model


def _trained(site: SiteRuntime, model: FedShiftModel) -> ArrayRecord:
    """What the site sends; under personal-bn it first keeps its scale/shift."""
    if site.cfg.personal_bn:
        save_personal(model, _personal_path(site))
    return trainable_arrays(model)


def training_config(site: SiteRuntime, config: ConfigRecord) -> LocalTrainingConfig:
    cfg = site.cfg
    round_ = max(1, int(config.get("server-round", 1)))
    return LocalTrainingConfig(
        epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        lr=cfg.lr * cfg.lr_decay ** (round_ - 1), optimizer=cfg.optimizer,
        clip=cfg.clip, proximal_mu=float(config.get("proximal-mu", 0.0)),
    )


def noise_plan(site: SiteRuntime, num_examples: int, train_cfg: LocalTrainingConfig) -> NoisePlan:
    """The run's noise plan: fixed at the site's first round so the planned run fits its budget."""
    assert site.ledger is not None
    existing = site.ledger.plan(site.run_key)
    if existing is not None:
        return existing
    steps = steps_per_round(num_examples, train_cfg)
    sample_rate = poisson_sample_rate(num_examples, train_cfg.batch_size)
    moment_noise = site.cfg.moment_noise if site.cfg.shift else 0.0
    reserved = [class_sums_release(moment_noise, site.cfg.num_rounds)] if moment_noise else []
    try:
        sigma = noise_for_budget(
            site.ledger.target_epsilon, site.ledger.delta, sample_rate,
            steps * site.cfg.num_rounds, spent=[*site.ledger.releases("train"), *reserved],
        )
    except ValueError as exc:
        raise BudgetExceeded(f"cannot plan the run's training: {exc}") from exc
    plan = NoisePlan(noise_multiplier=sigma, sample_rate=sample_rate, steps_per_round=steps,
                     planned_rounds=site.cfg.num_rounds, moment_noise=moment_noise)
    logger.info("%s: noise multiplier %.3f for %d rounds x %d steps at sample rate %.4f "
                "(moment noise %g reserved)", site.name, sigma, plan.planned_rounds, steps,
                sample_rate, moment_noise)
    return site.ledger.fix_plan(site.run_key, plan)


def train_site(site: SiteRuntime, arrays: ArrayRecord, config: ConfigRecord
               ) -> tuple[ArrayRecord, dict[str, float | int]]:
    """One round of local training; the update and its metrics, privacy charged."""
    round_ = int(config.get("server-round", 0))
    images, labels = site.data.images["train"], site.data.labels["train"]
    train_cfg = training_config(site, config)
    metrics: dict[str, float | int] = {"num-examples": len(labels)}
    start = time.perf_counter()
    if site.ledger is None:
        model = site_model(site, arrays)
        outcome = train_locally(model, images, labels, train_cfg, None, site.device)
        metrics.update({"train-loss": outcome.mean_loss, "steps": outcome.steps,
                        "compute-seconds": time.perf_counter() - start})
        return _trained(site, model), metrics
    plan = noise_plan(site, len(labels), train_cfg)
    release = GaussianRelease(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    what = f"DP-SGD round {round_}"
    steps = steps_per_round(len(labels), train_cfg)
    sample_rate = poisson_sample_rate(len(labels), train_cfg.batch_size)
    if (steps, sample_rate) != (plan.steps_per_round, plan.sample_rate):
        raise ConfigError(
            f"refused {what}: local training would take {steps} steps at sample rate "
            f"{sample_rate:.4g}, but this site's noise plan for the run fixed "
            f"{plan.steps_per_round} steps at {plan.sample_rate:.4g}, which is what the ledger "
            "charges; restore the run's local-epochs and batch-size"
        )
    site.ledger.check(release, what)
    model = site_model(site, arrays)
    outcome = train_locally(model, images, labels, train_cfg, plan.noise_multiplier, site.device)
    if outcome.steps != plan.steps_per_round:
        raise RuntimeError(
            f"took {outcome.steps} steps but planned {plan.steps_per_round}; nothing is sent"
        )
    epsilon = site.ledger.charge(release, site.run_key, round_, what)
    site.ledger.record_allowed(site.run_key, round_, "training example count",
                               "example-weighted aggregation")
    metrics.update({
        "compute-seconds": time.perf_counter() - start,
        "train-loss": outcome.mean_loss, "steps": site.ledger.steps_taken(site.run_key),
        "epsilon-spent": epsilon, "delta": site.ledger.delta,
        "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
    })
    return _trained(site, model), metrics


def evaluate_site(site: SiteRuntime, arrays: ArrayRecord, config: ConfigRecord
                  ) -> dict[str, float | int]:
    """Metrics of the global model on the site's test split (a release the site allows)."""
    start = time.perf_counter()
    model = site_model(site, arrays)
    labels = site.data.labels["test"].numpy()
    probs = predict_probs(model, site.data.images["test"], site.device)
    metrics: dict[str, float | int] = {"num-examples": len(labels)}
    metrics.update(classification_metrics(labels, probs))
    metrics["compute-seconds"] = time.perf_counter() - start
    if site.ledger is not None:
        site.ledger.record_allowed(site.run_key, int(config.get("server-round", 0)),
                                   "test-set evaluation metrics", "allow-metrics")
    return metrics
