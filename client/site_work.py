"""What a site does for a train or evaluate message, Flower aside.

Every DP release is checked against the run's noise plan and charged to the
site's ledger before its reply is built; every non-DP value goes out only where
the site's policy names its release, and the ledger records it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from client.local_training import (
    LocalTrainingConfig,
    poisson_sample_rate,
    steps_per_round,
    train_locally,
)
from client.own_model import decision_model
from client.personal_params import apply_personal, personal_path, save_personal
from client.privacy_ledger import BudgetExceeded, NoisePlan, Reservation
from client.site_norms import load_statistics, norms_path, save_statistics
from client.site_runtime import SiteRuntime
from common.classification_metrics import classification_metrics
from common.federation_config import ConfigError
from common.messages import NON_DP_RELEASES, EvaluateReply, Request, TrainReply
from common.model_surgery import FedShiftModel, build_model
from common.norm_adaptation import adaptation_release, apply_statistics, estimate_statistics
from common.prediction import calibrated_predictions, predict_logits
from common.privacy_accounting import GaussianRelease, noise_for_budget
from common.private_summaries import class_sums_release, noisy_histogram
from common.shift_estimators import estimators_for, release_noise_multiplier
from common.trainable_arrays import load_trainable_arrays, trainable_arrays

logger = logging.getLogger(__name__)


def _personal_path(site: SiteRuntime) -> Path:
    return personal_path(site.files_dir, site.name, site.run_key)


def _norms_path(site: SiteRuntime) -> Path:
    return norms_path(site.files_dir, site.name, site.run_key)


def reference_model(site: SiteRuntime, arrays: ArrayRecord) -> FedShiftModel:
    """The global model with the pretrained statistics: the same at every site."""
    model = build_model(site.cfg.model_spec())
    load_trainable_arrays(model, arrays)
    return model


def site_model(site: SiteRuntime, arrays: ArrayRecord) -> FedShiftModel:
    """The global model as this site uses it: with its own scale/shift under personal-bn
    and its own statistics of the first ``adapt-norm-layers`` normalisation layers.

    Raises
    ------
    ConfigError
        When the run adapts statistics and this site has none for it yet (it
        estimates them with its first training round).
    """
    model = reference_model(site, arrays)
    if site.cfg.personal_bn:
        apply_personal(model, _personal_path(site))
    if site.cfg.adapt_norm_layers:
        statistics = load_statistics(_norms_path(site))
        if statistics is None:
            raise ConfigError(
                f"run {site.run_key} adapts normalisation statistics, which site {site.name} "
                "estimates with its first training round of the run, and it has not trained "
                "in this run yet"
            )
        apply_statistics(model, statistics)
    return model


def adapt_norms(site: SiteRuntime, arrays: ArrayRecord, plan: NoisePlan | None,
                round_: int) -> None:
    """Estimate the site's statistics of its first ``adapt-norm-layers`` normalisation
    layers, once per run (a run that has them keeps them): under the run's reserved
    Gaussian mechanism and charged before they are kept and used, or exactly in a run
    without DP (``plan`` None)."""
    cfg = site.cfg
    path = _norms_path(site)
    if not cfg.adapt_norm_layers or path.exists():
        return
    what = f"normalisation statistics of {cfg.adapt_norm_layers} layers"
    release = None
    if site.ledger is not None:
        assert plan is not None
        if site.ledger.made(site.run_key, "norm-statistics", "train"):
            raise BudgetExceeded(
                f"refused training: this run estimated and charged its {what} already, but "
                f"their file {path} is gone and the plan holds no budget to estimate them "
                "again; restore the file or start a new run"
            )
        release = reserved_release(site, plan, "norm-statistics", "train", what)
        asked = adaptation_release(cfg.adapt_norm_noise, cfg.adapt_norm_layers)
        if asked != release:
            raise ConfigError(
                f"refused the {what}: adapt-norm-noise {cfg.adapt_norm_noise:g} over "
                f"{cfg.adapt_norm_layers} layers costs noise multiplier "
                f"{asked.noise_multiplier:.4g}, but the run's noise plan reserved "
                f"{release.noise_multiplier:.4g}; restore the run's adapt-norm settings"
            )
    model = reference_model(site, arrays)
    statistics = estimate_statistics(
        model, cfg.adapt_norm_layers, site.data.images["train"], cfg.adapt_norm_clip,
        cfg.adapt_norm_noise if release is not None else None, rng(), site.device)
    if release is not None:
        assert site.ledger is not None
        site.ledger.charge(release, site.run_key, round_, what, "train", "norm-statistics", plan)
    save_statistics(path, statistics)
    logger.info("%s: estimated and kept its %s (%s)", site.name, what,
                "DP" if release is not None else "exact, no DP")


def _trained(site: SiteRuntime, model: FedShiftModel) -> ArrayRecord:
    """What the site sends; under personal-bn it first keeps its scale/shift."""
    if site.cfg.personal_bn:
        save_personal(model, _personal_path(site))
    return trainable_arrays(model)


def training_config(site: SiteRuntime, request: Request) -> LocalTrainingConfig:
    cfg = site.cfg
    return LocalTrainingConfig(
        epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        lr=cfg.lr * cfg.lr_decay ** (request.server_round - 1), optimizer=cfg.optimizer,
        clip=cfg.clip, proximal_mu=request.proximal_mu,
    )


def reservations(site: SiteRuntime) -> tuple[Reservation, ...]:
    """The releases besides DP-SGD a run may make at this site, within its policy."""
    cfg, policy = site.cfg, site.policy
    out = []
    if cfg.adapt_norm_layers:
        out.append(Reservation("norm-statistics", "train",
                               adaptation_release(cfg.adapt_norm_noise,
                                                  cfg.adapt_norm_layers).noise_multiplier, 1))
    shift = cfg.shift and policy.shift_summaries
    if shift and policy.label_histograms:
        out.append(Reservation("moments", "train",
                               class_sums_release(cfg.moment_noise).noise_multiplier,
                               cfg.num_rounds))
    if policy.weights == "dp-count":
        out.append(Reservation("count", "train", policy.count_noise, 1))
    evaluations = min(policy.max_evaluations, cfg.evaluations)
    if evaluations:
        out.append(Reservation("evaluation", "test", cfg.evaluation_noise, evaluations))
    if shift:
        out.append(Reservation("score-histogram", "validation", cfg.histogram_noise, 1))
        if len(site.data.images.get("pool", ())):
            # The deployment pool's budget is one Gaussian mechanism at histogram-noise,
            # shared equally by the label-shift estimators (common.shift_estimators).
            noise = release_noise_multiplier(cfg.histogram_noise, cfg.num_classes)
            out.extend(Reservation(e.mechanism, "deployment", noise, 1)
                       for e in estimators_for(cfg.num_classes))
    return tuple(out)


def noise_plan(site: SiteRuntime) -> NoisePlan:
    """The run's noise plan: fixed with the run's first release, so the whole run fits.

    The releases the run may make besides DP-SGD (:func:`reservations`) are set
    aside first; DP-SGD's noise multiplier is the smallest that fits what is left.
    """
    assert site.ledger is not None
    existing = site.ledger.plan(site.run_key)
    if existing is not None:
        return existing
    ledger = site.ledger
    num_examples = len(site.data.labels["train"])
    train_cfg = training_config(site, Request(server_round=1, run_key=site.run_key))
    steps = steps_per_round(num_examples, train_cfg)
    sample_rate = poisson_sample_rate(num_examples, train_cfg.batch_size)
    reserved = reservations(site)
    composing = [r.release(r.releases) for r in reserved
                 if ledger.composition == "sequential" or r.part == "train"]
    try:
        sigma = noise_for_budget(ledger.target_epsilon, ledger.delta, sample_rate,
                                 steps * site.cfg.num_rounds,
                                 spent=[*ledger.composing_with("train"), *composing])
    except ValueError as exc:
        raise BudgetExceeded(
            f"cannot plan the run: {exc} (the run reserves {_describe(reserved)} besides "
            "DP-SGD; fewer evaluations or noisier summaries leave more for training)"
        ) from exc
    whole = [(GaussianRelease(sigma, sample_rate, steps * site.cfg.num_rounds), "train"),
             *[(r.release(r.releases), r.part) for r in reserved]]
    certified = ledger.certificate_after(whole)
    if certified.epsilon > ledger.target_epsilon + 1e-9:
        raise BudgetExceeded(f"cannot plan the run: its reserved releases "
                             f"({_describe(reserved)}) do not fit the budget left")
    plan = NoisePlan(noise_multiplier=sigma, sample_rate=sample_rate, steps_per_round=steps,
                     planned_rounds=site.cfg.num_rounds,
                     moment_noise=site.cfg.moment_noise if site.cfg.shift else 0.0,
                     reserved=reserved, accountant=certified.accountant)
    logger.info("%s: noise multiplier %.3f for %d rounds x %d steps at sample rate %.4f; "
                "reserved %s; the whole run certified at epsilon %.4f by %s (RDP %.4f)",
                site.name, sigma, plan.planned_rounds, steps, sample_rate,
                _describe(reserved), certified.epsilon, certified.accountant.upper(),
                certified.rdp_epsilon)
    return plan


def _describe(reserved: tuple[Reservation, ...]) -> str:
    return ", ".join(f"{r.releases} {r.mechanism} on {r.part} at noise {r.noise_multiplier:.3g}"
                     for r in reserved) or "nothing"


def reserved_release(site: SiteRuntime, plan: NoisePlan, mechanism: str, part: str,
                     what: str) -> GaussianRelease:
    """The next release of ``mechanism`` on ``part``, if the plan has one left that fits."""
    assert site.ledger is not None
    reservation = plan.reservation(mechanism, part)
    if reservation is None:
        raise BudgetExceeded(
            f"refused {what}: this run's noise plan reserved no budget for it (the site's "
            "policy or the run config had it off when the run began); nothing was sent"
        )
    done = len(site.ledger.made(site.run_key, mechanism, part))
    if done >= reservation.releases:
        raise BudgetExceeded(
            f"refused {what}: the run's plan reserved {reservation.releases} and {done} "
            "were released already; nothing was sent"
        )
    release = reservation.release()
    site.ledger.check(release, what, part)
    return release


def rng() -> np.random.Generator:
    return np.random.default_rng()


def _weight(site: SiteRuntime, plan: NoisePlan | None, round_: int) -> float:
    """The update's aggregation weight, as the site's policy has it."""
    n = len(site.data.labels["train"])
    if site.policy.weights == "dp-count" and site.ledger is not None and plan is not None:
        earlier = site.ledger.made(site.run_key, "count", "train")
        if earlier and earlier[0].value is not None:
            return earlier[0].value
        what = "DP training record count"
        release = reserved_release(site, plan, "count", "train", what)
        value = float(max(1.0, n + rng().normal(0.0, release.noise_multiplier)))
        site.ledger.charge(release, site.run_key, round_, what, "train", "count", plan, value)
        return value
    if site.policy.allows("example-count"):
        return float(n)
    return 1.0


def allowed_extras(site: SiteRuntime, round_: int, values: dict[str, float]
                    ) -> dict[str, float]:
    """The non-DP values the site's policy allows, each release recorded in the ledger."""
    out = {}
    for release, keys in NON_DP_RELEASES.items():
        chosen = {k: v for k, v in values.items()
                  if k in keys or any(k.startswith(p) for p in keys if p.endswith("."))}
        if chosen and site.policy.allows(release):
            out.update(chosen)
            if site.ledger is not None:
                site.ledger.record_allowed(site.run_key, round_, ", ".join(sorted(chosen)),
                                           f"release {release}")
    return out


def train_site(site: SiteRuntime, arrays: ArrayRecord, request: Request) -> TrainReply:
    """One round of local training; the update, privacy charged."""
    round_ = request.server_round
    images, labels = site.data.images["train"], site.data.labels["train"]
    train_cfg = training_config(site, request)
    start = time.perf_counter()
    extras: dict[str, float] = {"num-examples": len(labels),
                                "skipped-images": site.skipped_images}
    if site.ledger is None:
        adapt_norms(site, arrays, None, round_)
        model = site_model(site, arrays)
        outcome = train_locally(model, images, labels, train_cfg, None, site.device)
        extras.update({"train-loss": outcome.mean_loss,
                       "compute-seconds": time.perf_counter() - start})
        return TrainReply(_trained(site, model), _weight(site, None, round_), site.name,
                          allowed_extras(site, round_, extras))
    plan = noise_plan(site)
    release = GaussianRelease(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    what = f"DP-SGD round {round_}"
    trained = site.ledger.made(site.run_key, "dp-sgd")
    if any(e.round == round_ for e in trained):
        raise BudgetExceeded(f"refused {what}: this run trained and charged round {round_} "
                             "already; nothing was trained or sent")
    if len(trained) >= plan.planned_rounds:
        raise BudgetExceeded(f"refused {what}: the run's noise plan covers "
                             f"{plan.planned_rounds} rounds of training, all of them done; "
                             "nothing was trained or sent")
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
    adapt_norms(site, arrays, plan, round_)
    weight = _weight(site, plan, round_)
    model = site_model(site, arrays)
    outcome = train_locally(model, images, labels, train_cfg, plan.noise_multiplier, site.device)
    if outcome.steps != plan.steps_per_round:
        raise RuntimeError(
            f"took {outcome.steps} steps but planned {plan.steps_per_round}; nothing is sent"
        )
    site.ledger.charge(release, site.run_key, round_, what, plan=plan)
    extras.update({"train-loss": outcome.mean_loss,
                   "compute-seconds": time.perf_counter() - start})
    return TrainReply(_trained(site, model), weight, site.name,
                      allowed_extras(site, round_, extras))


def evaluate_site(site: SiteRuntime, arrays: ArrayRecord, request: Request) -> EvaluateReply:
    """DP-noised confusion counts of the global model's argmax on the site's test split
    (charged); the exact metrics, where the site releases them, are the site's own
    decisions: its operating point (:mod:`common.operating_point`) on the model it
    decides with (:func:`client.own_model.decision_model`)."""
    start = time.perf_counter()
    round_ = request.server_round
    k = site.cfg.num_classes
    what = f"evaluation round {round_}"
    plan = release = None
    if site.ledger is not None:
        plan = noise_plan(site)
        release = reserved_release(site, plan, "evaluation", "test", what)
    model = site_model(site, arrays)
    labels = site.data.labels["test"].numpy()
    data = site.data
    # The released counts are DP for the test split only, so they must not depend on
    # another part: the operating point is fitted on the validation split, and one
    # validation record could move the threshold and many counts with it; the own
    # model is trained on the training split. They use the global model's argmax; the
    # site's own decisions stay local (and in the exact metrics, which the site's
    # policy must release by name).
    global_logits = predict_logits(model, data.images["test"], site.device)
    # Everything that can fail comes before the charge.
    decider, _ = decision_model(site, model)
    own = calibrated_predictions(decider, data.images["val"], data.labels["val"],
                                 data.images["test"], site.device,
                                 site.policy.target_sensitivity)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (labels, np.argmax(global_logits, axis=1)), 1.0)
    noise_std = 0.0
    if site.ledger is not None and release is not None:
        noisy, release = noisy_histogram(confusion, release.noise_multiplier, rng())
        confusion, noise_std = noisy, release.noise_multiplier
        site.ledger.charge(release, site.run_key, round_, what, "test", "evaluation", plan)
    exact = classification_metrics(labels, own.probs, own.decisions)
    extras = {key: exact[key] for key in ("accuracy", "balanced_accuracy", "auroc", "loss")}
    extras.update({"num-examples": len(labels), "skipped-images": site.skipped_images,
                   "compute-seconds": time.perf_counter() - start})
    return EvaluateReply(confusion, noise_std, site.name, allowed_extras(site, round_, extras))
