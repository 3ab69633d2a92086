"""What a site answers to the server's shift queries (``query.shift``), Flower aside.

Two kinds, chosen by the message's ``kind`` config value:

``moments`` (every round)
    DP per-class sums of per-image normalisation-input moments of the site's
    training images under the current global model with the pretrained
    statistics (a site's adapted statistics stay out, so every site is read
    through the same model), and DP per-class counts (the label histogram).
    Charged to the ``train`` part of the ledger, within the run's noise plan,
    which reserved the cost of one such release per round.
``deployment`` (after the last round)
    DP histograms of the global model's scores: of the labelled validation split
    per true class (``validation`` part) and of the unlabelled deployment pool
    (``deployment`` part), each at the run's ``histogram-noise``, under the model
    the site predicts with (with its adapted statistics, where the run adapts).
    From these the site fits its calibration, estimates its deployment priors by
    MLLS and corrects its predictions by Bayes' rule; when the pool has audit
    labels (simulations) it reports metrics with and without correction, a
    non-DP release its policy must name (``audit-metrics``).

Every release's noise was fixed by the run's plan (:func:`client.site_work.noise_plan`),
which reserved its cost before DP-SGD's noise was sized.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.privacy_ledger import BudgetExceeded, NoisePlan
from client.site_runtime import SiteRuntime
from client.site_work import (
    allowed_extras,
    noise_plan,
    reference_model,
    reserved_release,
    rng,
    site_model,
)
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
from common.messages import DeploymentReply, MomentsReply, Request
from common.norm_moments import image_moments, moment_layout
from common.prediction import predict_logits
from common.private_summaries import noisy_class_sums, noisy_histogram

logger = logging.getLogger(__name__)


def _centre(request: Request, shape: tuple[int, int, int]) -> np.ndarray:
    """The server's per-class feature centre from the query (zeros when it sends none)."""
    if request.moment_centre is None:
        return np.zeros(shape)
    centre = np.asarray(request.moment_centre, dtype=np.float64)
    if centre.size != int(np.prod(shape)):
        raise ConfigError(
            f"moment-centre must hold {int(np.prod(shape))} finite numbers "
            f"(classes x layers x features = {' x '.join(map(str, shape))}), got {centre.size}; "
            "the server and this site disagree on the model or moment-layers"
        )
    return centre.reshape(shape)


def moments_reply(site: SiteRuntime, arrays: ArrayRecord, request: Request) -> MomentsReply:
    """The round's DP moment sums and label histogram of the site's training split.

    The round's block clip is the server's choice (else the site's): the ledger's
    cost depends on the noise multiplier only, and the noise added scales with the
    clip, so a server asking for a wide clip gets noisier sums, not more privacy.
    """
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    round_ = request.server_round
    what = f"moment summary round {round_}"
    plan = noise_plan(site)
    if any(e.round == round_ for e in site.ledger.made(site.run_key, "moments")):
        raise BudgetExceeded(f"refused {what}: this run released round {round_}'s already")
    release = reserved_release(site, plan, "moments", "train", what)
    images, labels = site.data.images["train"], site.data.labels["train"]
    model = reference_model(site, arrays)
    layout = moment_layout(model, site.cfg.moment_layers,
                           request.moment_clip or site.cfg.moment_clip)
    centre = _centre(request, layout.centre_shape(site.cfg.num_classes))
    blocks = image_moments(model, layout, images, labels.numpy(), centre, site.device)
    noisy, release = noisy_class_sums(
        blocks.reshape(len(blocks), -1), labels.numpy(), site.cfg.num_classes,
        layout.sensitivity, plan.moment_noise, rng(),
    )
    site.ledger.charge(release, site.run_key, round_, what, "train", "moments", plan)
    return MomentsReply(
        sums=noisy.sums.reshape(site.cfg.num_classes, len(layout.layer_names), layout.width),
        counts=noisy.counts, sum_noise_std=noisy.sum_noise_std,
        count_noise_std=noisy.count_noise_std, site=site.name)


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    m = classification_metrics(labels, probs)
    return {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "auroc": m["auroc"], "nll": m["loss"],
            "ece": expected_calibration_error(labels, probs)}


def _histogram(site: SiteRuntime, plan: NoisePlan, part: str, counts: np.ndarray,
               round_: int) -> tuple[np.ndarray, float]:
    """``counts`` released with the noise the plan reserved for ``part``'s histogram."""
    assert site.ledger is not None
    what = f"{part} score histogram"
    release = reserved_release(site, plan, "score-histogram", part, what)
    noisy, release = noisy_histogram(counts, release.noise_multiplier, rng())
    site.ledger.charge(release, site.run_key, round_, what, part, "score-histogram", plan)
    return noisy, release.noise_multiplier


def deployment_reply(site: SiteRuntime, arrays: ArrayRecord, request: Request
                     ) -> DeploymentReply:
    """DP score histograms of the validation split and the deployment pool, and corrections."""
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    round_ = request.server_round
    k = site.cfg.num_classes
    plan = noise_plan(site)
    has_pool = "pool" in site.data.images and len(site.data.images["pool"]) > 0
    reserved_release(site, plan, "score-histogram", "validation", "validation score histogram")
    if has_pool:
        reserved_release(site, plan, "score-histogram", "deployment",
                         "deployment score histogram")
    model = site_model(site, arrays)
    val_logits = predict_logits(model, site.data.images["val"], site.device)
    val_labels = site.data.labels["val"].numpy()
    val_hist, z_val = _histogram(site, plan, "validation",
                                 histogram(score_bins(val_logits), val_labels, k), round_)
    if not has_pool:
        return DeploymentReply(val_hist=val_hist, val_noise_std=z_val, site=site.name)
    pool_logits = predict_logits(model, site.data.images["pool"], site.device)
    pool_hist, z_pool = _histogram(site, plan, "deployment",
                                   histogram(score_bins(pool_logits), None, k), round_)
    priors: tuple[float, ...] = ()
    extras: dict[str, float] = {}
    if k == 2:
        priors, extras = _correction(site, val_hist, pool_hist, pool_logits, round_)
    return DeploymentReply(val_hist=val_hist, val_noise_std=z_val, site=site.name,
                           pool_hist=pool_hist, pool_noise_std=z_pool, priors=priors,
                           extras=extras)


def _correction(site: SiteRuntime, val_hist: np.ndarray, pool_hist: np.ndarray,
                pool_logits: np.ndarray, round_: int
                ) -> tuple[tuple[float, ...], dict[str, float]]:
    """The site's MLLS priors (from its released histograms) and, where its policy allows
    audit metrics and the pool has audit labels, metrics with and without correction."""
    calibration = fit_bcts(val_hist)
    if not calibration.converged:
        logger.warning("%s: calibration fit from the validation histogram failed; the "
                       "deployment prior uses the uncalibrated scores", site.name)
    source = np.array(calibration.source_prior)
    prior = mlls(pool_hist, calibration.posterior(BINARY_CENTRES), source)
    priors = tuple(float(p) for p in prior)
    labels = site.data.labels.get("pool")
    if labels is None or not site.policy.allows("audit-metrics"):
        return priors, {}
    labels_np = labels.numpy()
    calibrated = calibration.posterior(pool_logits[:, 1] - pool_logits[:, 0])
    corrected = correct_priors(calibrated, prior, source)
    raw = torch.softmax(torch.from_numpy(pool_logits), dim=1).numpy()
    out = {f"{name}.{key}": value
           for name, probs in (("raw", raw), ("uncorrected", calibrated),
                               ("corrected", corrected))
           for key, value in _metrics(labels_np, probs).items()}
    return priors, allowed_extras(site, round_, out)


def answer_shift_query(site: SiteRuntime, arrays: ArrayRecord, request: Request
                       ) -> MomentsReply | DeploymentReply:
    """Dispatch on the query's ``kind`` (checked by :class:`common.messages.Request`)."""
    if request.kind == "moments":
        return moments_reply(site, arrays, request)
    return deployment_reply(site, arrays, request)
