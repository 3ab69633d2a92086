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


def _reply(node: int, name: str, value: float, n: int, w: np.ndarray | None = None) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    w = np.full(3, value, dtype=np.float32) if w is None else w
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(w)}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": value}),
        "site": ConfigRecord({"name": name}),
    })
    return Message(content, reply_to=request)


def _refusal(node: int, reason: str) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=4001, reason=reason), reply_to=request)


def _strategy(**kwargs: object) -> FedShiftStrategy:
    strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=1, **kwargs)
    strategy._current = {"w": np.zeros(3, dtype=np.float32)}
    return strategy


def test_example_weighted_average_and_site_records() -> None:
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 100), _reply(2, "b", 4.0, 300), _refusal(3, "over budget"),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.25))
    assert metrics["train-loss"] == pytest.approx(3.25)
    entry = strategy.history[0]
    assert entry["sites"]["a"]["train"]["num-examples"] == 100
    assert entry["refused"] == {"node-3 (train)": "over budget"}


def test_fedadam_moves_towards_the_mean_with_adam_steps() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 2.0, 10)])
    # First Adam step: m = 0.1 * d, v = 0.01 * d^2, so the step is lr * 0.1 d / (0.1 |d| + tau).
    expected = 0.1 * 0.2 / (np.sqrt(0.01 * 4.0) + 1e-3)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, expected), rtol=1e-6)


def test_unknown_aggregator() -> None:
    with pytest.raises(ValueError, match="aggregator must be"):
        FedShiftStrategy(aggregator="median")


@pytest.mark.parametrize(("bad", "reason"), [
    (np.array([1.0, np.nan, 1.0], dtype=np.float32), "NaN or infinite"),
    (np.array([1.0, np.inf, 1.0], dtype=np.float32), "NaN or infinite"),
    (np.ones(4, dtype=np.float32), "shape"),
    (np.ones(3, dtype=np.float64), "dtype"),
    (np.full(3, 100.0, dtype=np.float32), "exceeds max-update-norm 10"),
])
def test_bad_updates_are_rejected_with_a_reason_and_not_averaged(bad: np.ndarray,
                                                                 reason: str) -> None:
    strategy = _strategy(max_update_norm=10.0)
    arrays, _ = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 100), _reply(2, "b", 4.0, 300), _reply(3, "bad", 0.0, 10**6, w=bad),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.25))
    entry = strategy.history[0]
    assert reason in entry["rejected"]["bad"]
    assert set(entry["rejected"]) == {"bad"}
    assert entry["sites"]["b"]["update_norm"] == pytest.approx(4.0 * np.sqrt(3))


def test_a_round_with_only_rejected_updates_aggregates_nothing() -> None:
    strategy = _strategy()
    bad = np.array([np.nan, 0.0, 0.0], dtype=np.float32)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 0.0, 10, w=bad)])
    assert arrays is None
    assert "NaN" in strategy.history[0]["rejected"]["a"]


def test_fewer_usable_updates_than_min_train_nodes_aggregate_nothing() -> None:
    strategy = _strategy()
    strategy.min_train_nodes = 2
    bad = np.array([np.nan, 0.0, 0.0], dtype=np.float32)
    arrays, _ = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 10), _reply(2, "b", 0.0, 10, w=bad), _refusal(3, "over budget")])
    assert arrays is None
    assert set(strategy.history[0]["rejected"]) == {"b"}
    assert strategy.history[0]["refused"] == {"node-3 (train)": "over budget"}


def test_missing_sites_are_named_from_earlier_replies() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(1, "a", 1.0, 10), _reply(2, "b", 1.0, 10)])
    sent = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in (1, 2, 7)]
    missing = strategy.record_missing(2, "train", sent, [_reply(1, "a", 1.0, 10)])
    assert missing == ["b", "node-7"]
    assert strategy.history[-1]["missing"] == {"train": ["b", "node-7"]}


def test_state_round_trip_keeps_history_names_and_adam_moments() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    strategy.aggregate_train(1, [_reply(1, "a", 2.0, 10)])
    state, arrays = strategy.state()
    again = _strategy(aggregator="fedadam", server_lr=0.1)
    again.restore(state, arrays)
    assert again.history == strategy.history and again.site_names == {1: "a"}
    second = [_reply(1, "a", 3.0, 10)]
    np.testing.assert_array_equal(again.aggregate_train(2, second)[0]["w"].numpy(),
                                  strategy.aggregate_train(2, second)[0]["w"].numpy())
