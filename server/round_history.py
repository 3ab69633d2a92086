"""What the server records of each round: who answered, what, and what was done with it.

:attr:`RoundHistory.entries` holds one entry per round (``history.json``'s
``rounds``; the strategy writes the train and evaluate parts, the ServerApp the
missing sites and the wall times)::

    {"round": int,
     "train": {extra: mean over the accepted replies that carry it},
     "evaluate": {"accuracy", "balanced_accuracy", "noise_std", "confusion", "sites",
                  extra: mean over the replies that carry it} or {},
     "sites": {label: {"node": node id,
                       "train": {"weight": as reported, extra: value},
                       "update_norm": float, "aggregation_weight": float (bounded),
                       "evaluate": {"accuracy", "balanced_accuracy", "noise_std",
                                    "confusion", extra: value}}},
     "refused": {"<label> (<phase>)": reason},   # error replies (a site's refusal)
     "rejected": {label: reason,                 # train replies dropped by the server
                  "<label> (evaluate)": reason}, # evaluate replies dropped
     "missing": {phase: [label, ...]},
     "seconds": {phase: server wall time},
     "kept_global": reason or None}              # why the round kept the global parameters

``label`` is the site's name, unless another node holds it
(:mod:`server.site_labels`). ``extra`` are the named non-DP releases a site's
configuration allows (``train-loss``, ``compute-seconds``, ... see
:data:`common.messages.NON_DP_RELEASES`); an evaluate extra named like a metric
the server derives from the confusion counts (``accuracy``,
``balanced_accuracy``) is kept as ``reported-<name>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message

from server.site_labels import SiteLabels, addressed_node, destinations

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


class RoundHistory:
    """The run's per-round records, keyed by node label.

    Parameters
    ----------
    labels : SiteLabels or None (default: None)
        The node -> label map to record sites under; share it with the shift
        monitor so that both name a node alike. None: a new one.
    on_round : callable or None (default: None)
        Called with each round's entry by :meth:`end_round`.
    """

    def __init__(self, labels: SiteLabels | None = None,
                 on_round: RoundCallback | None = None) -> None:
        self.labels = labels if labels is not None else SiteLabels()
        self.on_round = on_round
        self.entries: list[dict[str, Any]] = []
        self._sent_to: dict[str, int] = {}

    def entry(self, server_round: int) -> dict[str, Any]:
        """``server_round``'s entry, opened when it is not the last one."""
        if not self.entries or self.entries[-1]["round"] != server_round:
            self.entries.append({"round": server_round, "train": {}, "evaluate": {},
                                 "sites": {}, "refused": {}, "rejected": {}, "missing": {},
                                 "seconds": {}, "kept_global": None})
        return self.entries[-1]

    def record_seconds(self, server_round: int, phase: str, seconds: float) -> None:
        """Note the wall time the server spent waiting for ``phase``'s replies."""
        self.entry(server_round)["seconds"][phase] = seconds

    def record_missing(self, server_round: int, phase: str, sent: Iterable[Message],
                       replies: Iterable[Message]) -> list[str]:
        """Note the sites that were sent ``phase`` work but did not answer in time
        (or for which the SuperLink answered that the node is unavailable)."""
        sent = list(sent)
        self._sent_to = destinations(sent)
        answered = {m.metadata.src_node_id for m in replies}
        missing = [self.labels.known(m.metadata.dst_node_id)
                   for m in sent if m.metadata.dst_node_id not in answered]
        if missing:
            self.entry(server_round)["missing"][phase] = missing
            logger.warning("round %d %s: no reply from %s; going on without them",
                           server_round, phase, ", ".join(missing))
        return missing

    def who(self, msg: Message) -> tuple[str, int]:
        """The label and node id of the node a reply is about; an error the SuperLink
        wrote for an unreachable node is about the node the request went to."""
        node = addressed_node(msg, self._sent_to)
        return self.labels.reply_label(msg, node), node

    @staticmethod
    def site(entry: dict[str, Any], label: str, node: int) -> dict[str, Any]:
        """The site's record in ``entry``, opened when new."""
        return entry["sites"].setdefault(label, {"node": node})

    @staticmethod
    def reject(entry: dict[str, Any], key: str, server_round: int, phase: str,
               reason: str) -> None:
        """Note in ``entry`` that the server dropped ``key``'s reply, and why."""
        entry["rejected"][key] = reason
        logger.warning("round %d: rejected %s's %s reply: %s", server_round, key.split(" (")[0],
                       phase, reason)

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Close ``server_round``'s entry: hand it to ``on_round`` and return it."""
        entry = self.entry(server_round)
        if self.on_round is not None:
            self.on_round(entry)
        return entry

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the entries and the node -> label map."""
        return {"history": self.entries, "labels": self.labels.as_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the state :meth:`state` gave."""
        self.entries = list(state.get("history", []))
        self.labels.restore(state.get("labels", state.get("site_names", {})))
