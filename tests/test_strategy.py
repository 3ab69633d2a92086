"""FedShiftStrategy: example-weighted FedAvg, FedAdam, per-site records and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from server.strategy import FedShiftStrategy

pytestmark = pytest.mark.usefixtures("server_identity")


def _reply(node: int, name: str, value: float, n: int) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": value}),
        "site": ConfigRecord({"name": name}),
    })
    return Message(content, reply_to=request)


def _refusal(node: int, reason: str) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=4001, reason=reason), reply_to=request)


def test_example_weighted_average_and_site_records() -> None:
    strategy = FedShiftStrategy(min_available_nodes=1)
    arrays, metrics = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 100), _reply(2, "b", 4.0, 300), _refusal(3, "over budget"),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.25))
    assert metrics["train-loss"] == pytest.approx(3.25)
    entry = strategy.history[0]
    assert entry["sites"]["a"]["train"]["num-examples"] == 100
    assert entry["refused"] == {"node-3 (train)": "over budget"}


def test_fedadam_moves_towards_the_mean_with_adam_steps() -> None:
    strategy = FedShiftStrategy(aggregator="fedadam", server_lr=0.1, min_available_nodes=1)
    strategy._current = {"w": np.zeros(3, dtype=np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 2.0, 10)])
    # First Adam step: m = 0.1 * d, v = 0.01 * d^2, so the step is lr * 0.1 d / (0.1 |d| + tau).
    expected = 0.1 * 0.2 / (np.sqrt(0.01 * 4.0) + 1e-3)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, expected), rtol=1e-6)


def test_unknown_aggregator() -> None:
    with pytest.raises(ValueError, match="aggregator must be"):
        FedShiftStrategy(aggregator="median")
