"""FedShiftStrategy: the run's Flower strategy behind fedshift's reply checks, with records.

Every reply is parsed with the typed records of :mod:`common.messages` and checked
(:mod:`server.reply_checks`) before anything is aggregated; a reply that fails is
dropped with its reason in the round's history, and the round goes on with the
others. The strategy never raises on what a site sends.

Each reply, accepted or not, is recorded in the run's round history
(:class:`server.round_history.RoundHistory`), as is every round the strategy
keeps the global parameters in and why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common.messages import EvaluateReply, MessageError, TrainReply
from server.aggregator_state import array_state, restore_array_state
from server.aggregators import AggregatorSettings, get_aggregator
from server.reply_checks import bound_weights, check_update, check_weight
from server.round_history import RoundCallback, RoundHistory
from server.site_labels import SiteLabels

logger = logging.getLogger(__name__)

DERIVED_EVALUATE = ("accuracy", "balanced_accuracy", "noise_std", "confusion", "sites")
"""Evaluate metrics the server derives from the confusion counts (a site's extra of
the same name is recorded as ``reported-<name>``)."""


def confusion_metrics(confusion: np.ndarray, noise_std: float) -> dict[str, Any]:
    """Accuracy and balanced accuracy of a (noisy) confusion matrix, rows = true classes.

    DP noise can make cells negative; they are clipped at 0 before the metrics
    are computed (the recorded ``confusion`` is the matrix as released). A class
    whose clipped row is empty does not count towards balanced accuracy; a metric
    with nothing to count is None.
    """
    clipped = np.clip(np.asarray(confusion, dtype=np.float64), 0.0, None)
    total = float(clipped.sum())
    rows = clipped.sum(axis=1)
    present = rows > 0
    recalls = np.diag(clipped)[present] / rows[present]
    return {
        "accuracy": float(np.trace(clipped) / total) if total > 0 else None,
        "balanced_accuracy": float(recalls.mean()) if recalls.size else None,
        "noise_std": float(noise_std),
        "confusion": np.asarray(confusion, dtype=np.float64).tolist(),
    }


def _evaluate_extras(extras: Mapping[str, float]) -> dict[str, float]:
    return {(f"reported-{k}" if k in DERIVED_EVALUATE else k): v for k, v in extras.items()}


def _mean_extras(extras: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each key's mean over the mappings that carry it."""
    values: dict[str, list[float]] = {}
    for one in extras:
        for key, value in one.items():
            values.setdefault(key, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in values.items()}


def _malformed(exc: Exception) -> str:
    return str(exc) if isinstance(exc, MessageError) else (
        f"malformed reply ({type(exc).__name__}: {exc})")


class FedShiftStrategy(Strategy):
    """One of Flower's strategies, fed only replies that pass fedshift's checks, with records.

    The wrapped strategy (the ``aggregator``, :mod:`server.aggregators`) samples
    the sites and aggregates; this class stands between it and the sites, the
    way Flower's own differential-privacy wrappers do. Each train reply is parsed
    and checked first: a reply that is malformed, not finite, of the wrong names,
    shapes or dtypes, too far from the global parameters or with a weight that is
    not positive is dropped with its reason. The weights of the replies that pass
    are bounded: every weight is clipped to at most ``max_weight_ratio`` times the
    lower median weight of the round's accepted replies
    (:func:`server.reply_checks.bound_weights`). The aggregator then gets those
    replies' parameters in float64 with their bounded weights, and its aggregate
    is cast back to the global parameters' dtypes; an aggregate that is not
    finite, or an aggregator that fails, keeps the global parameters and undoes
    the aggregator's state for the round. Evaluate replies are DP-noised confusion
    counts; the round's evaluation is computed from their sum.

    Besides aggregating, it records in :attr:`rounds` (a
    :class:`server.round_history.RoundHistory`) every site's own train and
    evaluation figures, every refusal (a site over its privacy budget, say) and
    every rejected reply, each with its reason; :meth:`state` gives that history
    and the aggregator's state between rounds to the checkpoint.

    Parameters
    ----------
    aggregator : str or FedAvg (default: "fedavg")
        A registered aggregator's name (:data:`server.aggregators.AGGREGATORS`:
        ``fedavg``, ``fedadam``, ``fedprox``, ``fedavgm``, ``fedmedian``, ...), or a
        Flower array strategy to wrap as it is (then pass no sampling settings).
    proximal_mu : float (default: 0.0)
        FedProx proximal weight sent to sites as ``proximal-mu`` (``fedprox`` only).
    server_lr : float (default: 0.01)
        Server learning rate of ``fedadam``, ``fedyogi`` and ``fedadagrad``.
    max_update_norm : float (default: 0.0)
        Training replies whose parameters moved further than this (L2 norm over
        all trainable parameters) from the global ones are rejected, like replies
        with non-finite values or the wrong names, shapes or dtypes; 0 turns the
        norm bound off.
    max_weight_ratio : float (default: 4.0)
        Largest aggregation weight relative to the lower median weight of the
        round's accepted replies (>= 1); larger weights are clipped to it, so one
        site weighs at most this many median sites.
    num_classes : int (default: 2)
        Classes of the task: the size of the confusion matrices evaluate replies carry.
    on_round : callable or None (default: None)
        Called with each round's history entry as the round ends
        (:meth:`server.round_history.RoundHistory.end_round`).
    labels : SiteLabels or None (default: None)
        The node -> label map to record sites under; share it with the shift
        monitor so that both name a node alike. None: a new one.
    **sampling
        Passed to the aggregator (sampling fractions and minimum node counts). A
        round whose usable updates (replies that are not errors and pass the
        checks) number fewer than ``min_train_nodes`` keeps the global parameters.

    Raises
    ------
    AggregatorError
        For an aggregator name that is not registered; the message lists the names.
    """

    def __init__(
        self,
        aggregator: str | FedAvg = "fedavg",
        proximal_mu: float = 0.0,
        server_lr: float = 0.01,
        max_update_norm: float = 0.0,
        max_weight_ratio: float = 4.0,
        num_classes: int = 2,
        on_round: RoundCallback | None = None,
        labels: SiteLabels | None = None,
        **sampling: Any,
    ) -> None:
        if not (math.isfinite(max_weight_ratio) and max_weight_ratio >= 1):
            raise ValueError(f"max_weight_ratio must be a finite number >= 1, got "
                             f"{max_weight_ratio!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(aggregator, str):
            settings = AggregatorSettings(proximal_mu=proximal_mu, server_lr=server_lr)
            sampling.setdefault("weighted_by_key", TrainReply.WEIGHT)
            aggregator = get_aggregator(aggregator).build(settings, **sampling)
        elif sampling:
            raise ValueError("give the sampling settings to the strategy passed as aggregator, "
                             f"not here: {', '.join(sorted(sampling))}")
        self.aggregator = aggregator
        self.max_update_norm = max_update_norm
        self.max_weight_ratio = float(max_weight_ratio)
        self.num_classes = num_classes
        self.rounds = RoundHistory(labels, on_round)
        self._current: dict[str, np.ndarray] = {}

    @property
    def min_train_nodes(self) -> int:
        """Usable updates a round needs to aggregate (the aggregator's minimum)."""
        return self.aggregator.min_train_nodes

    def summary(self) -> None:
        logger.info("FedShiftStrategy: aggregator %s, max update norm %g, max weight ratio %g",
                    type(self.aggregator).__name__, self.max_update_norm,
                    self.max_weight_ratio)
        self.aggregator.summary()

    @property
    def history(self) -> list[dict[str, Any]]:
        """The round history's entries."""
        return self.rounds.entries

    @property
    def labels(self) -> SiteLabels:
        """The node -> label map the round history records sites under."""
        return self.rounds.labels

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps: (history and the node -> label map, the aggregator's
        array state, :func:`server.aggregator_state.array_state`)."""
        return self.rounds.state(), array_state(self.aggregator)

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Take back the state :meth:`state` gave.

        Raises
        ------
        ValueError
            When ``arrays`` is not state of this aggregator.
        """
        restore_array_state(self.aggregator, arrays)
        self.rounds.restore(state)

    def _answers(self, entry: dict[str, Any], server_round: int, phase: str,
                 replies: Iterable[Message]) -> Iterator[tuple[str, int, Message]]:
        """(label, node, reply) of each node's first reply that is not an error; a site's
        refusal goes to ``refused``, a second reply from one node to ``rejected``."""
        seen: set[int] = set()
        tag = "" if phase == "train" else f"{phase}, "
        for msg in replies:
            label, node = self.rounds.who(msg)
            if msg.has_error():
                entry["refused"][f"{label} ({phase})"] = msg.error.reason
            elif node in seen:
                self.rounds.reject(entry, f"{label} ({tag}duplicate)", server_round, phase,
                                   f"a second {phase} reply from the same node in one round")
            else:
                seen.add(node)
                yield label, node, msg

    # ------------------------------------------------------------------ training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: a.numpy() for k, a in arrays.items()}
        return self.aggregator.configure_train(server_round, arrays, config, grid)

    def _parse_train(self, msg: Message) -> tuple[TrainReply | None, dict[str, np.ndarray],
                                                  str | None]:
        """The typed reply and its parameters, or a reason to reject it."""
        try:
            reply = TrainReply.parse(msg)
            update = {k: a.numpy() for k, a in reply.arrays.items()}
        except Exception as exc:  # a site's reply must never end the run
            return None, {}, _malformed(exc)
        return reply, update, check_weight(reply.weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.rounds.entry(server_round)
        accepted: list[tuple[str, int, float, dict[str, np.ndarray], dict[str, float]]] = []
        for label, node, msg in self._answers(entry, server_round, "train", replies):
            reply, update, reason = self._parse_train(msg)
            if reply is None or reason is not None:
                self.rounds.reject(entry, label, server_round, "train", reason or "unparsed")
                continue
            site = self.rounds.site(entry, label, node)
            site["train"] = {"weight": reply.weight, **reply.extras}
            check = check_update(update, self._current, self.max_update_norm)
            if check.reason is not None:
                self.rounds.reject(entry, label, server_round, "train", check.reason)
                continue
            site["update_norm"] = check.norm
            accepted.append((label, node, reply.weight, update, reply.extras))
        entry["train"] = {}
        if not accepted or len(accepted) < self.min_train_nodes:
            return self._keep(entry, server_round, f"{len(accepted)} usable update(s), "
                              f"min-sites is {self.min_train_nodes}")
        weights = bound_weights([w for _, _, w, _, _ in accepted], self.max_weight_ratio)
        for (label, *_), weight in zip(accepted, weights, strict=True):
            entry["sites"][label]["aggregation_weight"] = float(weight)
        aggregate, reason = self._aggregate(server_round, [
            self._checked_reply(node, update, weight)
            for (_, node, _, update, _), weight in zip(accepted, weights, strict=True)])
        if aggregate is None:
            return self._keep(entry, server_round, reason)
        metrics = _mean_extras(e for *_, e in accepted)
        entry["train"] = metrics
        return aggregate, MetricRecord(metrics)

    def _checked_reply(self, node: int, update: dict[str, np.ndarray], weight: float
                       ) -> Message:
        """A reply for the aggregator: only the checked parameters, in float64, and the
        bounded weight under the aggregator's weight key."""
        arrays = ArrayRecord({k: Array(update[k].astype(np.float64)) for k in self._current})
        content = RecordDict({self.aggregator.arrayrecord_key: arrays,
                              "metrics": MetricRecord({self.aggregator.weighted_by_key: weight})})
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

    def _aggregate(self, server_round: int, replies: list[Message]
                   ) -> tuple[ArrayRecord | None, str]:
        """The aggregator's aggregate in the global parameters' dtypes, or None and why;
        with None, the aggregator's state is as it was before."""
        name = type(self.aggregator).__name__
        before = array_state(self.aggregator)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                aggregated, _ = self.aggregator.aggregate_train(server_round, replies)
                out = None if aggregated is None else {
                    k: aggregated[k].numpy().astype(ref.dtype) for k, ref in self._current.items()}
        except Exception as exc:  # Flower's aggregation errors, whichever they are
            out, reason = None, f"{name} could not aggregate ({type(exc).__name__}: {exc})"
        else:
            reason = f"{name} aggregated nothing"
        if out is not None:
            bad = sorted(k for k, v in out.items() if not np.all(np.isfinite(v)))
            if not bad:
                return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()}), ""
            reason = f"the aggregate is not finite in {bad[:3]}"
        restore_array_state(self.aggregator, before)
        return None, reason

    def _keep(self, entry: dict[str, Any], server_round: int, reason: str
              ) -> tuple[None, None]:
        entry["kept_global"] = reason
        logger.warning("round %d: keeping the global parameters: %s", server_round, reason)
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.aggregator.configure_evaluate(server_round, arrays, config, grid)

    # ---------------------------------------------------------------- evaluation

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Sum the sites' noisy confusion counts; pooled and per-site accuracy from them.

        The pooled figures come from the sum of the accepted replies' matrices
        (negative cells clipped at 0, see :func:`confusion_metrics`), with
        ``noise_std`` the noise standard deviation of each cell of the sum (the
        square root of the sum of the sites' variances).
        """
        entry = self.rounds.entry(server_round)
        accepted: list[EvaluateReply] = []
        for label, node, msg in self._answers(entry, server_round, "evaluate", replies):
            try:
                reply = EvaluateReply.parse(msg, self.num_classes)
            except Exception as exc:  # a site's reply must never end the run
                self.rounds.reject(entry, f"{label} (evaluate)", server_round, "evaluate",
                                   _malformed(exc))
                continue
            self.rounds.site(entry, label, node)["evaluate"] = {
                **confusion_metrics(reply.confusion, reply.noise_std),
                **_evaluate_extras(reply.extras)}
            accepted.append(reply)
        if not accepted:
            entry["evaluate"] = {}
            return None
        pooled = confusion_metrics(sum(r.confusion for r in accepted),
                                   math.sqrt(sum(r.noise_std ** 2 for r in accepted)))
        pooled["sites"] = len(accepted)
        pooled.update(_evaluate_extras(_mean_extras(r.extras for r in accepted)))
        entry["evaluate"] = pooled
        return MetricRecord({k: v for k, v in pooled.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)})
