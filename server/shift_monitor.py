"""The server's side of shift estimation: query every site, keep the summaries, report.

Each round, after evaluation, :meth:`ShiftMonitor.moments_round` sends
``query.shift`` (kind ``moments``) with the new global model to every site and
scores every site's covariate shift against the rest of the federation, for the
round alone and accumulated over the rounds so far (the flag uses the
accumulated evidence). After the last round :meth:`ShiftMonitor.deployment`
asks for the score histograms of each site's validation split, fits the
federation's calibration and soft confusion matrix from them
(:class:`common.shift_estimators.ShiftModel`), sends them with the deployment
query, and turns each site's released estimator statistics into deployment
priors with 90 % intervals (MLLS and BBSE, :mod:`common.shift_estimators`). The
released pool histograms also go to a test of every pool for a shift of the
model's outputs that a prior change cannot explain (:mod:`common.output_shift`);
besides, every site's training prior, importance weights and concept-shift gap.
Everything here is computed from DP releases only.

Every reply is parsed with :class:`common.messages.MomentsReply` or
:class:`common.messages.DeploymentReply`; one that is malformed (a missing
record, an unknown key, a wrong shape, a non-finite value) is recorded in
:attr:`ShiftMonitor.refused` with its reason and skipped, like a site's refusal:
the monitor never raises on what a site sends. Sites are recorded under the
labels of :class:`server.site_labels.SiteLabels` (by node identity), the same map
the strategy uses when it is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.covariate_score import (
    FLAG_Z,
    SiteMoments,
    covariate_scores,
    federation_centre,
)
from common.label_shift import (
    BINARY_CENTRES,
    binary_posteriors,
    concept_gap,
    correct_priors,
    importance_weights,
    normalise,
    num_bins,
)
from common.messages import (
    ARRAYS,
    CONFIG,
    RUN_KEY,
    SHIFT_QUERY_TYPE,
    DeploymentReply,
    MessageError,
    MomentsReply,
    Request,
    ValidationReply,
)
from common.norm_moments import MomentLayout
from common.output_shift import output_shifts
from common.shift_estimators import SharedCalibration, ShiftModel, estimators_for
from server.phase_progress import PhaseReporter
from server.site_labels import SiteLabels, addressed_node, destinations

logger = logging.getLogger(__name__)

CENTRING_CLIP_FACTOR = 4.0
QUERY_PHASES = {"moments": "shift query", "validation": "calibration query",
                "deployment": "deployment query"}
"""The progress phase (:data:`server.phase_progress.PHASES`) of each kind of query."""


class ShiftMonitor:
    """Sends shift queries and turns the DP replies into per-site shift estimates.

    Parameters
    ----------
    grid : Grid
        Flower grid to reach the sites.
    layout : MomentLayout
        The moment layout every site derives from the same model.
    num_classes : int
        Classes of the task.
    timeout : float or None (default: None)
        Seconds to wait for replies; None waits for all.
    run_key : str (default: "")
        The run's key, sent with every query so that the sites' ledgers charge
        the same run across a server restart; empty: none is sent and the sites
        use Flower's run id.
    labels : SiteLabels or None (default: None)
        The node -> label map to record sites under: pass the strategy's
        (:attr:`server.strategy.FedShiftStrategy.labels`) so that both name a node
        alike. None: a new one.
    progress : PhaseReporter or None (default: None)
        Exchanges the queries with the sites and reports them as the phases
        ``shift query``, ``calibration query`` and ``deployment query``. None: one
        that reports nothing.
    """

    def __init__(self, grid: Grid, layout: MomentLayout, num_classes: int,
                 timeout: float | None = None, run_key: str = "",
                 labels: SiteLabels | None = None,
                 progress: PhaseReporter | None = None) -> None:
        self.grid = grid
        self.progress = progress if progress is not None else PhaseReporter(0)
        self.run_key = run_key
        self.labels = labels if labels is not None else SiteLabels()
        self.layout = layout
        self.num_classes = num_classes
        self.timeout = timeout
        self.rounds: list[dict[str, Any]] = []
        self.refused: dict[str, str] = {}
        self._total: dict[str, SiteMoments] = {}
        self._counts: dict[str, np.ndarray] = {}
        self.centre = np.zeros(layout.centre_shape(num_classes))
        self.final: dict[str, Any] = {}
        self._rng = np.random.default_rng()
        self._replicates: list[SharedCalibration] | None = None

    def state(self) -> dict[str, Any]:
        """The monitor's state as JSON-safe values, for the server's checkpoint."""
        return {
            "rounds": self.rounds, "refused": self.refused, "centre": self.centre.tolist(),
            "labels": self.labels.as_dict(),
            "counts": {n: c.tolist() for n, c in self._counts.items()},
            "total": {n: {"sums": m.sums.tolist(), "counts": m.counts.tolist(),
                          "sum_noise_var": m.sum_noise_var,
                          "count_noise_var": m.count_noise_var, "rounds": m.rounds}
                      for n, m in self._total.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the state :meth:`state` gave."""
        self.rounds = list(state["rounds"])
        self.refused = dict(state["refused"])
        self.labels.restore(state.get("labels", {}))
        self.centre = np.asarray(state["centre"], dtype=np.float64).reshape(self.centre.shape)
        self._counts = {n: np.asarray(c, dtype=np.float64) for n, c in state["counts"].items()}
        self._total = {
            n: SiteMoments(np.asarray(m["sums"], dtype=np.float64),
                           np.asarray(m["counts"], dtype=np.float64),
                           float(m["sum_noise_var"]), float(m["count_noise_var"]),
                           float(m.get("rounds", 1.0)))
            for n, m in state["total"].items()
        }

    def _ask(self, kind: str, server_round: int, arrays: ArrayRecord,
             centre: tuple[float, ...] | None = None, clip: float | None = None,
             calibration: tuple[float, ...] | None = None) -> dict[str, Message]:
        """Send a ``kind`` query to every node; the replies that are not errors, by label."""
        config = Request(server_round=server_round, run_key=self.run_key, kind=kind,
                         moment_centre=centre, moment_clip=clip,
                         calibration=calibration).to_config()
        if not self.run_key:
            del config[RUN_KEY]
        messages = [
            Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node,
                    message_type=SHIFT_QUERY_TYPE)
            for node in self.grid.get_node_ids()
        ]
        answers = {}
        replies, _ = self.progress.exchange(self.grid, messages, self.timeout, server_round,
                                            QUERY_PHASES[kind])
        sent_to = destinations(messages)
        for reply in replies:
            node = addressed_node(reply, sent_to)
            label = self.labels.reply_label(reply, node)
            if reply.has_error() or not reply.has_content():
                reason = reply.error.reason if reply.has_error() else "empty reply"
                self._refuse(label, kind, server_round, reason)
                continue
            if label in answers:
                self._refuse(f"{label} (duplicate)", kind, server_round,
                             "a second reply from the same node")
                continue
            answers[label] = reply
        return answers

    def _refuse(self, label: str, kind: str, server_round: int, reason: str) -> None:
        self.refused[f"{label} ({kind}, round {server_round})"] = reason
        logger.warning("shift query %s, round %d: %s's reply refused: %s", kind, server_round,
                       label, reason)

    def _parse(self, replies: dict[str, Message], kind: str, server_round: int,
               parse: Callable[[Message], Any]) -> dict[str, Any]:
        """Each reply parsed by ``parse``; a reply that fails is refused with the reason."""
        parsed = {}
        for label, msg in replies.items():
            try:
                parsed[label] = parse(msg)
            except Exception as exc:  # a site's reply must never end the run
                reason = str(exc) if isinstance(exc, MessageError) else (
                    f"malformed reply ({type(exc).__name__}: {exc})")
                self._refuse(label, kind, server_round, reason)
        return parsed

    def _scores(self, moments: dict[str, SiteMoments], clip: float) -> dict[str, dict[str, Any]]:
        scores = covariate_scores(moments, self.layout.layer_names, clip)
        return {name: s.to_dict() for name, s in scores.items()}

    def _round_clip(self) -> float:
        """Block clip for the next release: wide until the sites' centre has been estimated.

        The privacy cost depends on the noise multiplier only, so a wider clip
        costs nothing more; it adds noise, which is why such a round only finds
        the centre and does not join the accumulated evidence.
        """
        return self.layout.clip * (1.0 if self._counts else CENTRING_CLIP_FACTOR)

    def moments_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Ask for this round's moments; score the round alone and the rounds so far.

        Sites centre their features on :attr:`centre`, which then moves to the
        median of the sites' class means of this round's releases. The first
        round, with no centre yet, is released at a wide clip so that its class
        means are not shrunk by clipping; from the next round on, releases at
        the layout's clip accumulate.
        """
        clip = self._round_clip()
        accumulating = clip == self.layout.clip
        replies = self._ask("moments", server_round, arrays,
                            centre=tuple(float(v) for v in self.centre.ravel()), clip=clip)
        shape = (self.num_classes, len(self.layout.layer_names), self.layout.width)
        parsed = self._parse(replies, "moments", server_round,
                             lambda msg: MomentsReply.parse(msg, sums_shape=shape))
        this_round = {}
        for name, reply in parsed.items():
            this_round[name] = SiteMoments(reply.sums, reply.counts,
                                           reply.sum_noise_std ** 2, reply.count_noise_std ** 2)
            self._counts[name] = self._counts.get(name, 0.0) + this_round[name].counts
            if accumulating:
                self._total[name] = (self._total[name].then(this_round[name])
                                     if name in self._total else this_round[name])
        if this_round:
            self.centre = self.centre + federation_centre(this_round)
        alone = self._scores(this_round, clip)
        accumulated = {n: self._total[n] for n in this_round if n in self._total}
        cumulative = self._scores(accumulated, clip) if accumulated else alone
        entry = {"round": server_round, "clip": clip, "sites": {}}
        for name, score in cumulative.items():
            entry["sites"][name] = {**score, "round_score": alone[name]["covariate_score"],
                                    "round_threshold": alone[name]["covariate_threshold"]}
        self.rounds.append(entry)
        flagged = [n for n, s in cumulative.items() if s["covariate_flagged"]]
        logger.info("round %d covariate shift flagged at: %s", server_round,
                    ", ".join(flagged) or "no site")

    def training_priors(self) -> dict[str, np.ndarray]:
        """Each site's class fractions from its label histograms (all rounds pooled)."""
        return {n: normalise(c) for n, c in self._counts.items()}

    def deployment(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Ask for the validation histograms, fit the federation's calibration, send it
        with the deployment query; estimate every site's priors (with intervals) and
        concept shift."""
        replies = self._ask("validation", server_round, arrays)
        shape = (self.num_classes, num_bins(self.num_classes))
        parsed: dict[str, ValidationReply] = self._parse(
            replies, "validation", server_round,
            lambda msg: ValidationReply.parse(msg, hist_shape=shape))
        val = {n: r.val_hist for n, r in parsed.items()}
        counts = sum(self._counts.values()) if self._counts else None
        fed_prior = normalise(counts) if counts is not None else normalise(
            sum(v.sum(axis=1) for v in val.values()))
        model = ShiftModel.fit(list(val.values()), [r.val_noise_std for r in parsed.values()]
                               ) if val else None
        if model is not None and model.calibration is not None and (
                not model.calibration.converged):
            logger.warning("the federation's calibration fit from the validation histograms "
                           "failed; the deployment priors use the uncalibrated scores")
        self._replicates = None
        deployed = self._deployment_releases(server_round, arrays, model)
        training = self.training_priors()
        outputs = self._output_shifts(deployed)
        sites: dict[str, Any] = {}
        gaps = {}
        for name, hist in val.items():
            row: dict[str, Any] = dict(self._final_covariate(name))
            if name in outputs:
                row.update(outputs[name].to_dict())
            train_prior = training.get(name, normalise(hist.sum(axis=1)))
            row["training_prior"] = train_prior.tolist()
            row["training_importance_weights"] = importance_weights(train_prior, fed_prior).tolist()
            if self.num_classes == 2:
                val_prior = normalise(hist.sum(axis=1))
                posteriors = correct_priors(binary_posteriors(BINARY_CENTRES), val_prior,
                                            fed_prior)
                gaps[name] = concept_gap(hist, posteriors, parsed[name].val_noise_std)
            sites[name] = row
        for name, reply in deployed.items():
            row = sites.setdefault(name, {})
            row.update(self._prior_estimates(reply, model))
            if "deployment_prior" in row:
                row["importance_weights"] = importance_weights(
                    np.asarray(row["deployment_prior"]), fed_prior).tolist()
            row["metrics"] = _correction_metrics(reply.extras)
        if gaps:
            median = float(np.median([g.gap for g in gaps.values()]))
            for name, g in gaps.items():
                threshold = FLAG_Z * g.std
                sites[name].update({
                    "concept_gap": g.gap - median, "concept_threshold": threshold,
                    "concept_flagged": g.gap - median > threshold,
                })
        shared = model.shared() if model is not None else None
        self.final = {
            "federation_prior": fed_prior.tolist(),
            "federation_confusion": None if shared is None else shared.confusion.tolist(),
            "federation_calibration": None if model is None or model.calibration is None else {
                "slope": model.calibration.slope, "bias": model.calibration.bias,
                "converged": model.calibration.converged},
            "sites": sites,
        }
        return self.final

    def _output_shifts(self, deployed: dict[str, DeploymentReply]) -> dict[str, Any]:
        """BBSD on the pools' released histograms: the MLLS release (score cells) for
        binary tasks, the BBSE release (predicted-class counts) otherwise."""
        release = "mlls" if self.num_classes == 2 else "bbse"
        pools = {n: r.releases[release] for n, r in deployed.items() if release in r.releases}
        return output_shifts(pools, {n: deployed[n].noise_stds[release] for n in pools},
                             self.num_classes)

    def _deployment_releases(self, server_round: int, arrays: ArrayRecord,
                             model: ShiftModel | None) -> dict[str, DeploymentReply]:
        """Send the federation's calibration with the deployment query; the parsed replies."""
        if model is None:
            return {}
        shapes = {e.name: e.statistic_shape(self.num_classes)
                  for e in estimators_for(self.num_classes)}
        replies = self._ask("deployment", server_round, arrays,
                            calibration=model.shared().to_values())
        return self._parse(replies, "deployment", server_round,
                           lambda msg: DeploymentReply.parse(msg, shapes=shapes))

    def _prior_estimates(self, reply: DeploymentReply, model: ShiftModel | None
                         ) -> dict[str, Any]:
        """Each estimator's released prior with its interval; the primary one (the first
        registered that applies) also as ``deployment_prior``."""
        out: dict[str, Any] = {}
        if model is None:
            return out
        if self._replicates is None:
            self._replicates = model.replicates(self._rng)
        for estimator in estimators_for(self.num_classes):
            if estimator.name not in reply.releases:
                continue
            estimate = estimator.combine(reply.releases[estimator.name],
                                         reply.noise_stds[estimator.name], model,
                                         self._replicates, self._rng)
            out.update(estimate.to_dict(estimator.key))
            if "deployment_prior" not in out:
                out.update(estimate.to_dict("deployment_prior"))
        return out

    def _final_covariate(self, name: str) -> dict[str, Any]:
        if not self.rounds or name not in self.rounds[-1]["sites"]:
            return {}
        last = self.rounds[-1]["sites"][name]
        keys = ("covariate_score", "covariate_threshold", "covariate_flagged", "top_layers")
        return {k: last[k] for k in keys}

    def report(self) -> dict[str, Any]:
        """The ``shift`` record of a run: per-round scores, final estimates, refusals."""
        return {"rounds": self.rounds, "final": self.final, "refused": self.refused,
                "layers": list(self.layout.layer_names)}


def _correction_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]] | None:
    """The audit metrics (``raw.x``, ``uncorrected.x``, ``corrected.x``) by variant."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        variant, _, metric = key.partition(".")
        if variant in ("raw", "uncorrected", "corrected") and metric:
            out.setdefault(variant, {})[metric] = float(value)
    return out or None
