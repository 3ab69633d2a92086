"""FedShiftStrategy: FedAvg over the trainable parameters, with per-site records."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.reply_checks import UpdateCheck, check_update

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


def addressed_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The node a reply is about: the request's destination when ``sent_to`` (message id
    to destination) knows it, since the SuperLink itself writes the error for a node
    that stopped answering; else the reply's sender."""
    return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def reply_site_name(msg: Message) -> str:
    """The site name a reply carries, else ``node-<id>`` (error replies carry none)."""
    site = msg.content.config_records.get("site") if msg.has_content() else None
    return str(site["name"]) if site and "name" in site else f"node-{msg.metadata.src_node_id}"


class FedShiftStrategy(FedAvg):
    """Example-weighted FedAvg of the trainable parameters, with FedAdam and FedProx options.

    Besides aggregating, it keeps a per-round history with every site's own train
    and evaluation metrics and every refusal (a site over its privacy budget, say)
    with its reason.

    Parameters
    ----------
    aggregator : str (default: "fedavg")
        ``fedavg``: the example-weighted mean of the sites' parameters.
        ``fedadam``: that mean's difference to the current global parameters is a
        pseudo-gradient for a server-side Adam step (Reddi et al. 2021).
        ``fedprox``: FedAvg, with ``proximal_mu`` sent to the sites.
    proximal_mu : float (default: 0.0)
        FedProx proximal weight sent to sites as ``proximal-mu`` (``fedprox`` only).
    server_lr : float (default: 0.01)
        FedAdam step size.
    beta_1, beta_2, tau : float (default: 0.9, 0.99, 1e-3)
        FedAdam moment decays and adaptivity.
    max_update_norm : float (default: 0.0)
        Training replies whose parameters moved further than this (L2 norm over
        all trainable parameters) from the global ones are rejected, like replies
        with non-finite values or the wrong names, shapes or dtypes; 0 turns the
        norm bound off.
    on_round : callable or None (default: None)
        Called with each round's history entry once the round's evaluation is in.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling fractions and
        minimum node counts). A round whose usable updates (replies that are not
        errors and pass the checks) number fewer than ``min_train_nodes`` keeps the
        global parameters.
    """

    def __init__(
        self,
        aggregator: str = "fedavg",
        proximal_mu: float = 0.0,
        server_lr: float = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        max_update_norm: float = 0.0,
        on_round: RoundCallback | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if aggregator not in ("fedavg", "fedadam", "fedprox"):
            raise ValueError(f"aggregator must be fedavg, fedadam or fedprox, got {aggregator!r}")
        self.aggregator = aggregator
        self.proximal_mu = proximal_mu if aggregator == "fedprox" else 0.0
        self.server_lr = server_lr
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau
        self.max_update_norm = max_update_norm
        self.on_round = on_round
        self.history: list[dict[str, Any]] = []
        self.site_names: dict[int, str] = {}
        self._sent_to: dict[str, int] = {}
        self._current: dict[str, np.ndarray] = {}
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        logger.info("FedShiftStrategy: aggregator %s, proximal mu %g, server lr %g",
                    self.aggregator, self.proximal_mu, self.server_lr)
        super().summary()

    def _entry(self, server_round: int) -> dict[str, Any]:
        if not self.history or self.history[-1]["round"] != server_round:
            self.history.append({"round": server_round, "train": {}, "evaluate": {},
                                 "sites": {}, "refused": {}, "rejected": {}, "missing": {},
                                 "seconds": {}})
        return self.history[-1]

    def record_seconds(self, server_round: int, phase: str, seconds: float) -> None:
        """Note the wall time the server spent waiting for ``phase``'s replies."""
        self._entry(server_round)["seconds"][phase] = seconds

    def _name(self, msg: Message) -> str:
        """The site a reply is about; an error the SuperLink wrote for an unreachable
        node is named after the node the request went to."""
        if msg.has_content():
            return reply_site_name(msg)
        node = addressed_node(msg, self._sent_to)
        return self.site_names.get(node, f"node-{node}")

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        entry = self._entry(server_round)
        for msg in replies:
            name = self._name(msg)
            if msg.has_error():
                entry["refused"][f"{name} ({phase})"] = msg.error.reason
                continue
            self.site_names[msg.metadata.src_node_id] = name
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            entry["sites"].setdefault(name, {})[phase] = dict(metrics)

    def record_missing(self, server_round: int, phase: str, sent: Iterable[Message],
                       replies: Iterable[Message]) -> list[str]:
        """Note the sites that were sent ``phase`` work but did not answer in time
        (or for which the SuperLink answered that the node is unavailable)."""
        sent = list(sent)
        self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered = {m.metadata.src_node_id for m in replies}
        missing = [self.site_names.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}")
                   for m in sent if m.metadata.dst_node_id not in answered]
        if missing:
            self._entry(server_round)["missing"][phase] = missing
            logger.warning("round %d %s: no reply from %s; going on without them",
                           server_round, phase, ", ".join(missing))
        return missing

    def _accepted(self, server_round: int, replies: list[Message]) -> list[Message]:
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            name = reply_site_name(msg)
            arrays = next(iter(msg.content.array_records.values()), None)
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            if arrays is None:
                check = UpdateCheck("no parameters in the reply")
            else:
                check = check_update({k: a.numpy() for k, a in arrays.items()}, self._current,
                                     metrics.get("num-examples"), self.max_update_norm)
            if check.reason is not None:
                self._entry(server_round)["rejected"][name] = check.reason
                logger.warning("round %d: rejected %s's update: %s", server_round, name,
                               check.reason)
                continue
            self._entry(server_round)["sites"].setdefault(name, {})["update_norm"] = check.norm
            kept.append(msg)
        return kept

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps: (history and site names, FedAdam moments)."""
        arrays = {f"m/{k}": v for k, v in self._m.items()}
        arrays.update({f"v/{k}": v for k, v in self._v.items()})
        return ({"history": self.history,
                 "site_names": {str(k): v for k, v in self.site_names.items()}}, arrays)

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Take back the state :meth:`state` gave."""
        self.history = list(state.get("history", []))
        self.site_names = {int(k): v for k, v in state.get("site_names", {}).items()}
        self._m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        self._v = {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: a.numpy() for k, a in arrays.items()}
        if self.aggregator == "fedprox":
            config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, "train", replies)
        accepted = self._accepted(server_round, replies)
        usable = sum(not r.has_error() for r in accepted)
        if usable < self.min_train_nodes:
            logger.warning("round %d: %d usable update(s), min-sites is %d; keeping the global "
                           "parameters", server_round, usable, self.min_train_nodes)
            self._entry(server_round)["train"] = {}
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.aggregator == "fedadam":
            arrays = self._adam_step(arrays)
        self._entry(server_round)["train"] = dict(metrics or {})
        return arrays, metrics

    def _adam_step(self, mean: ArrayRecord) -> ArrayRecord:
        updated = {}
        for key, avg in ((k, a.numpy()) for k, a in mean.items()):
            delta = avg - self._current[key]
            m = self.beta_1 * self._m.get(key, np.zeros_like(delta)) + (1 - self.beta_1) * delta
            v = self.beta_2 * self._v.get(key, np.zeros_like(delta)) + (1 - self.beta_2) * delta**2
            self._m[key], self._v[key] = m, v
            updated[key] = Array((self._current[key] + self.server_lr * m / (np.sqrt(v) + self.tau))
                                 .astype(avg.dtype))
        return ArrayRecord(updated)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        entry = self._entry(server_round)
        entry["evaluate"] = dict(metrics or {})
        if self.on_round is not None:
            self.on_round(entry)
        return metrics
