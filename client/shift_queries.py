"""What a site answers to the server's shift queries (``query.shift``), Flower aside.

Two kinds, chosen by the message's ``kind`` config value:

``moments`` (every round)
    DP per-class sums of per-image normalisation-input moments of the site's
    training images under the current global model, and DP per-class counts (the
    label histogram). Charged to the ``train`` part of the ledger, within the
    run's noise plan, which reserved the cost of one such release per round.
``deployment`` (after the last round)
    DP histograms of the global model's scores: of the labelled validation split
    per true class (``validation`` part) and of the unlabelled deployment pool
    (``deployment`` part), each at the largest noise its part's remaining budget
    requires. From these the site fits its calibration, estimates its deployment
    priors by MLLS and corrects its predictions by Bayes' rule; when the pool has
    audit labels (simulations) it reports metrics with and without correction, a
    release the site's ``allow-metrics`` permits.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from client.privacy_ledger import BudgetExceeded
from client.site_runtime import SiteRuntime
from client.site_work import noise_plan, site_model, training_config
from common.classification_metrics import classification_metrics
from common.federation_config import ConfigError
from common.label_shift import (
    BINARY_CENTRES,
    correct_priors,
    expected_calibration_error,
    fit_bcts,
    histogram,
    mlls,
    score_bins,
)
from common.norm_moments import image_moments, moment_layout
from common.prediction import predict_logits
from common.privacy_accounting import noise_for_budget
from common.private_summaries import class_sums_release, noisy_class_sums, noisy_histogram

logger = logging.getLogger(__name__)

QUERY_KINDS = ("moments", "deployment")


def _rng() -> np.random.Generator:
    return np.random.default_rng()


def _centre(config: ConfigRecord, shape: tuple[int, int, int]) -> np.ndarray:
    """The server's per-class feature centre from the query (zeros when it sends none)."""
    values = config.get("moment-centre")
    if values is None:
        return np.zeros(shape)
    centre = np.asarray(values, dtype=np.float64)
    if centre.size != int(np.prod(shape)) or not np.all(np.isfinite(centre)):
        raise ConfigError(
            f"moment-centre must hold {int(np.prod(shape))} finite numbers "
            f"(classes x layers x features = {' x '.join(map(str, shape))}), got {centre.size}; "
            "the server and this site disagree on the model or moment-layers"
        )
    return centre.reshape(shape)


def _clip(config: ConfigRecord, default: float) -> float:
    """The round's block clip: the server's choice, else the site's.

    The ledger's cost depends on the noise multiplier only; the noise added scales
    with the clip, so a server asking for a wide clip gets noisier sums, not more
    privacy spent.
    """
    value = config.get("moment-clip", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"moment-clip must be a positive number, got {value!r}")
    return float(value)


def moments_reply(site: SiteRuntime, arrays: ArrayRecord, config: ConfigRecord
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The round's DP moment sums and label histogram of the site's training split."""
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    round_ = int(config.get("server-round", 0))
    images, labels = site.data.images["train"], site.data.labels["train"]
    plan = noise_plan(site, len(labels), training_config(site, config))
    if not plan.moment_noise:
        raise ConfigError(
            "this site's noise plan for the run reserved no budget for shift summaries "
            "(it was fixed with shift = false); start a new run to release them"
        )
    done = sum(1 for e in site.ledger.entries()
               if e.get("mechanism") == "moments" and e.get("run") == site.run_key)
    if done >= plan.planned_rounds:
        raise BudgetExceeded(
            f"refused moment summary: the run's plan reserved {plan.planned_rounds} and "
            f"{done} were released already"
        )
    release = class_sums_release(plan.moment_noise)
    what = f"moment summary round {round_}"
    site.ledger.check(release, what, "train")
    model = site_model(site, arrays)
    layout = moment_layout(model, site.cfg.moment_layers, _clip(config, site.cfg.moment_clip))
    centre = _centre(config, layout.centre_shape(site.cfg.num_classes))
    blocks = image_moments(model, layout, images, labels.numpy(), centre, site.device)
    noisy, release = noisy_class_sums(
        blocks.reshape(len(blocks), -1), labels.numpy(), site.cfg.num_classes,
        layout.sensitivity, plan.moment_noise, _rng(),
    )
    epsilon = site.ledger.charge(release, site.run_key, round_, what, "train", "moments")
    return (
        {"sums": noisy.sums.reshape(site.cfg.num_classes, len(layout.layer_names), layout.width),
         "counts": noisy.counts},
        {"sum-noise-std": noisy.sum_noise_std, "count-noise-std": noisy.count_noise_std,
         "epsilon-spent": epsilon},
    )


def _part_noise(site: SiteRuntime, part: str) -> float:
    """Noise that spends what is left of ``part``'s budget on one histogram (one per run)."""
    assert site.ledger is not None
    earlier = [e for e in site.ledger.entries() if e.get("run") == site.run_key
               and e.get("part") == part and e.get("mechanism") == "score-histogram"]
    if earlier:
        raise BudgetExceeded(
            f"refused {part} score histogram: this run released one in round "
            f"{earlier[0]['round']} with this part's whole budget"
        )
    try:
        return noise_for_budget(site.ledger.target_epsilon, site.ledger.delta, 1.0, 1,
                                spent=site.ledger.releases(part))
    except ValueError as exc:
        raise BudgetExceeded(f"refused {part} score histogram: {exc}") from exc


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    m = classification_metrics(labels, probs)
    return {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "auroc": m["auroc"], "nll": m["loss"],
            "ece": expected_calibration_error(labels, probs)}


def deployment_reply(site: SiteRuntime, arrays: ArrayRecord, config: ConfigRecord
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """DP score histograms of the validation split and the deployment pool, and corrections."""
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    round_ = int(config.get("server-round", 0))
    k = site.cfg.num_classes
    model = site_model(site, arrays)
    val_logits = predict_logits(model, site.data.images["val"], site.device)
    val_labels = site.data.labels["val"].numpy()
    z_val = _part_noise(site, "validation")
    val_hist, release = noisy_histogram(histogram(score_bins(val_logits), val_labels, k),
                                        z_val, _rng())
    site.ledger.charge(release, site.run_key, round_, "validation score histogram",
                       "validation", "score-histogram")
    arrays_out: dict[str, np.ndarray] = {"val-hist": val_hist}
    metrics: dict[str, float] = {"val-noise-std": z_val}
    if "pool" in site.data.images and len(site.data.images["pool"]):
        pool_logits = predict_logits(model, site.data.images["pool"], site.device)
        z_pool = _part_noise(site, "deployment")
        pool_hist, release = noisy_histogram(histogram(score_bins(pool_logits), None, k),
                                             z_pool, _rng())
        site.ledger.charge(release, site.run_key, round_, "deployment score histogram",
                           "deployment", "score-histogram")
        arrays_out["pool-hist"] = pool_hist
        metrics["pool-noise-std"] = z_pool
        if k == 2:
            metrics.update(_correction(site, val_hist, pool_hist, pool_logits, round_))
    metrics["epsilon-spent"] = site.ledger.epsilon_spent()
    return arrays_out, metrics


def _correction(site: SiteRuntime, val_hist: np.ndarray, pool_hist: np.ndarray,
                pool_logits: np.ndarray, round_: int) -> dict[str, float]:
    """The site's MLLS priors and, with audit labels, metrics with and without correction."""
    assert site.ledger is not None
    calibration = fit_bcts(val_hist)
    source = np.array(calibration.source_prior)
    prior = mlls(pool_hist, calibration.posterior(BINARY_CENTRES), source)
    out: dict[str, float] = {f"mlls-prior.{c}": float(p) for c, p in enumerate(prior)}
    labels = site.data.labels.get("pool")
    if labels is None or not site.allow_metrics:
        return out
    labels_np = labels.numpy()
    calibrated = calibration.posterior(pool_logits[:, 1] - pool_logits[:, 0])
    corrected = correct_priors(calibrated, prior, source)
    raw = torch.softmax(torch.from_numpy(pool_logits), dim=1).numpy()
    for name, probs in (("raw", raw), ("uncorrected", calibrated), ("corrected", corrected)):
        for key, value in _metrics(labels_np, probs).items():
            out[f"{name}.{key}"] = value
    site.ledger.record_allowed(site.run_key, round_, "deployment-pool metrics with and "
                               "without prior correction (audit labels)", "allow-metrics")
    return out


def answer_shift_query(site: SiteRuntime, arrays: ArrayRecord, config: ConfigRecord
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Dispatch on the query's ``kind``."""
    kind = str(config.get("kind", ""))
    if kind == "moments":
        return moments_reply(site, arrays, config)
    if kind == "deployment":
        return deployment_reply(site, arrays, config)
    raise ConfigError(f"unknown shift query kind {kind!r}; kinds are {', '.join(QUERY_KINDS)}")
