"""Grids that stand in for Flower's in server tests: sites answer in process."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message

from common.messages import EvaluateReply, TrainReply

SUPERLINK_NODE_ID = 1
STEP = {2: 0.01, 3: 0.03}
"""What each fake site adds to every parameter per round (equal weights: the mean adds 0.02)."""
CONFUSION = {2: np.array([[8.0, 2.0], [1.0, 9.0]]), 3: np.array([[5.0, 5.0], [0.0, 10.0]])}
"""Each fake site's (noise-free) confusion counts, true class by row."""


class Crash(RuntimeError):
    """The server dies."""


class TrainingGrid:
    """Two sites that shift every parameter by a fixed step and report metrics.

    Train replies are :class:`TrainReply` records with equal weights (1) and a
    ``compute-seconds`` extra; evaluate replies :class:`EvaluateReply` records with
    the site's :data:`CONFUSION` counts (noise std 0).

    ``silent`` maps a round to the nodes that do not answer in it (too slow);
    ``unavailable`` to the nodes the SuperLink answers for with an error, as it
    does for a node that stopped sending heartbeats (a dead SuperNode).
    """

    def __init__(self, crash_at_round: int | None = None,
                 silent: dict[int, set[int]] | None = None,
                 unavailable: dict[int, set[int]] | None = None) -> None:
        self.crash_at_round = crash_at_round
        self.silent = silent or {}
        self.unavailable = unavailable or {}
        self.pushed = 0
        self.configs: list[dict] = []

    def get_node_ids(self) -> list[int]:
        return list(STEP)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"message-{self.pushed}"  # as Flower's grid
            config = dict(msg.content["config"])
            self.configs.append(config)
            if config["server-round"] == self.crash_at_round:
                raise Crash(f"server killed in round {self.crash_at_round}")
            node = msg.metadata.dst_node_id
            if node in self.silent.get(config["server-round"], set()):
                continue
            if node in self.unavailable.get(config["server-round"], set()):
                error = Message(Error(code=3, reason="Node Unavailable"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(error)
                continue
            name = f"site-{node}"
            if msg.metadata.message_type == "train":
                arrays = ArrayRecord({
                    k: Array(a.numpy() + np.asarray(STEP[node], dtype=a.numpy().dtype))
                    for k, a in msg.content["arrays"].items()})
                content = TrainReply(arrays=arrays, weight=1.0, site=name,
                                     extras={"compute-seconds": 0.5}).to_content()
            else:
                content = EvaluateReply(confusion=CONFUSION[node], noise_std=0.0,
                                        site=name).to_content()
            replies.append(Message(content, reply_to=msg))
        return replies


class LateGrid(TrainingGrid):
    """:class:`TrainingGrid` whose two sites connect only after ``absent_polls`` calls
    to ``get_node_ids`` (or never: None)."""

    def __init__(self, absent_polls: int | None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.absent_polls = absent_polls
        self.polls = 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        if self.absent_polls is None or self.polls <= self.absent_polls:
            return []
        return super().get_node_ids()
