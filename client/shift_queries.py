"""What a site answers to the server's shift queries (``query.shift``), Flower aside.

Three kinds, chosen by the message's ``kind`` config value:

``moments`` (every round)
    DP per-class sums of per-image normalisation-input moments of the site's
    training images under the current global model with the pretrained
    statistics (a site's adapted statistics stay out, so every site is read
    through the same model), and DP per-class counts (the label histogram).
    Charged to the ``train`` part of the ledger, within the run's noise plan,
    which reserved the cost of one such release per round.
``validation`` (after the last round)
    A DP score histogram of the labelled validation split per true class
    (``validation`` part, at the run's ``histogram-noise``), under the model the
    site predicts with (with its adapted statistics, where the run adapts). The
    server pools every site's into the federation's calibration.
``deployment`` (then)
    With the federation's calibration in the query (public: post-processing of
    DP releases), the site estimates its pool's priors locally at full
    precision, corrects its own predictions (nothing released; where its policy
    names ``audit-metrics`` and the pool has audit labels, as in simulations, it
    reports metrics with and without correction, a non-DP release) and releases
    each label-shift estimator's statistic with Gaussian noise (``deployment``
    part), as :mod:`common.shift_estimators` defines them.

Every release's noise was fixed by the run's plan (:func:`client.site_work.noise_plan`),
which reserved its cost before DP-SGD's noise was sized.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.privacy_ledger import BudgetExceeded
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
    correct_priors,
    expected_calibration_error,
    histogram,
    score_bins,
)
from common.messages import DeploymentReply, MomentsReply, Request, ValidationReply
from common.norm_moments import image_moments, moment_layout
from common.prediction import predict_logits
from common.private_summaries import noisy_class_sums, noisy_histogram
from common.shift_estimators import (
    LabelShiftEstimator,
    SharedCalibration,
    estimators_for,
)

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


def validation_reply(site: SiteRuntime, arrays: ArrayRecord, request: Request
                     ) -> ValidationReply:
    """The DP score histogram of the validation split per true class (``validation`` part).

    Each image adds 1 to one cell: sensitivity 1, noise std ``histogram-noise``.
    """
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    plan = noise_plan(site)
    what = "validation score histogram"
    release = reserved_release(site, plan, "score-histogram", "validation", what)
    model = site_model(site, arrays)
    logits = predict_logits(model, site.data.images["val"], site.device)
    counts = histogram(score_bins(logits), site.data.labels["val"].numpy(), site.cfg.num_classes)
    noisy, release = noisy_histogram(counts, release.noise_multiplier, rng())
    site.ledger.charge(release, site.run_key, request.server_round, what, "validation",
                       "score-histogram", plan)
    return ValidationReply(val_hist=noisy, val_noise_std=release.noise_multiplier,
                           site=site.name)


def deployment_reply(site: SiteRuntime, arrays: ArrayRecord, request: Request
                     ) -> DeploymentReply:
    """Every label-shift estimator's DP release about the pool, and the site's correction.

    The site estimates its pool's priors locally with the federation's calibration
    (the query's, public), corrects its own predictions with the primary estimate
    (nothing released) and releases each estimator's bounded-sensitivity statistic
    with the noise its reservation fixed (see :mod:`common.shift_estimators`).
    """
    if site.ledger is None:
        raise ConfigError("shift summaries are DP releases; this run has DP turned off")
    k = site.cfg.num_classes
    if request.calibration is None:
        raise ConfigError("a deployment query must carry the federation's calibration")
    try:
        shared = SharedCalibration.from_values(request.calibration, k)
    except ValueError as exc:
        raise ConfigError(f"calibration: {exc}") from None
    if "pool" not in site.data.images or not len(site.data.images["pool"]):
        return DeploymentReply(site=site.name)
    plan = noise_plan(site)
    estimators = estimators_for(k)
    releases = {e.name: reserved_release(site, plan, e.mechanism, "deployment",
                                         f"{e.name} deployment-prior statistic")
                for e in estimators}
    logits = predict_logits(site_model(site, arrays), site.data.images["pool"], site.device)
    cells = histogram(score_bins(logits), None, k)
    released, stds = {}, {}
    for estimator in estimators:
        what = f"{estimator.name} deployment-prior statistic"
        noisy, release = estimator.release(estimator.statistic(cells, shared),
                                           releases[estimator.name].noise_multiplier, rng())
        site.ledger.charge(release, site.run_key, request.server_round, what, "deployment",
                           estimator.mechanism, plan)
        released[estimator.name] = noisy
        stds[estimator.name] = release.noise_multiplier * estimator.sensitivity
    extras = _correction(site, logits, shared, estimators[0], request.server_round)
    return DeploymentReply(site=site.name, releases=released, noise_stds=stds, extras=extras)


def _correction(site: SiteRuntime, pool_logits: np.ndarray, shared: SharedCalibration,
                primary: LabelShiftEstimator, round_: int) -> dict[str, float]:
    """Where the site's policy allows audit metrics and the pool has audit labels: metrics
    with and without the correction by the site's own (local, unreleased) estimate."""
    labels = site.data.labels.get("pool")
    if labels is None or not site.policy.allows("audit-metrics"):
        return {}
    prior = primary.local_estimate(pool_logits, shared)
    source = np.asarray(shared.source_prior)
    raw = torch.softmax(torch.from_numpy(pool_logits), dim=1).numpy()
    calibrated = shared.image_posteriors(pool_logits) if site.cfg.num_classes == 2 else raw
    corrected = correct_priors(calibrated, prior, source)
    out = {f"{name}.{key}": value
           for name, probs in (("raw", raw), ("uncorrected", calibrated),
                               ("corrected", corrected))
           for key, value in _metrics(labels.numpy(), probs).items()}
    return allowed_extras(site, round_, out)


def answer_shift_query(site: SiteRuntime, arrays: ArrayRecord, request: Request
                       ) -> MomentsReply | ValidationReply | DeploymentReply:
    """Dispatch on the query's ``kind`` (checked by :class:`common.messages.Request`)."""
    if request.kind == "moments":
        return moments_reply(site, arrays, request)
    if request.kind == "validation":
        return validation_reply(site, arrays, request)
    return deployment_reply(site, arrays, request)
