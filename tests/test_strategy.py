"""FedShiftStrategy: bounded-weight FedAvg, FedAdam, evaluation, per-site records and refusals."""

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
    RecordDict,
)

from common.messages import EvaluateReply, TrainReply
from server.strategy import FedShiftStrategy

pytestmark = pytest.mark.usefixtures("server_identity")


def _reply(node: int, name: str, value: float, weight: float, w: np.ndarray | None = None,
           **extras: float) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    w = np.full(3, value, dtype=np.float32) if w is None else w
    content = TrainReply(arrays=ArrayRecord({"w": Array(w)}), weight=weight, site=name,
                         extras=extras).to_content()
    return Message(content, reply_to=request)


def _evaluation(node: int, name: str, confusion: list[list[float]], noise_std: float = 0.0,
                **extras: float) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    content = EvaluateReply(confusion=np.asarray(confusion, dtype=np.float64),
                            noise_std=noise_std, site=name, extras=extras).to_content()
    return Message(content, reply_to=request)


def _refusal(node: int, reason: str) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=4001, reason=reason), reply_to=request)


def _strategy(**kwargs: object) -> FedShiftStrategy:
    strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=1, **kwargs)
    strategy._current = {"w": np.zeros(3, dtype=np.float32)}
    return strategy


def test_weighted_average_by_the_replies_weights_and_site_records() -> None:
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 1.0, **{"train-loss": 0.5}), _reply(2, "b", 4.0, 3.0),
        _refusal(3, "over budget"),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.25))
    # Only the extras the replies carry, each the plain mean of the replies carrying it.
    assert dict(metrics) == {"train-loss": 0.5}
    entry = strategy.history[0]
    assert entry["train"] == {"train-loss": 0.5}
    assert entry["sites"]["a"]["train"] == {"weight": 1.0, "train-loss": 0.5}
    assert entry["sites"]["b"]["train"] == {"weight": 3.0}
    assert entry["sites"]["b"]["aggregation_weight"] == 3.0
    assert entry["sites"]["b"]["node"] == 2
    assert entry["refused"] == {"node-3 (train)": "over budget"}
    assert entry["kept_global"] is None


def test_a_weight_above_the_ratio_bound_is_clipped_to_it() -> None:
    strategy = _strategy(max_weight_ratio=2.0)
    arrays, _ = strategy.aggregate_train(1, [
        _reply(1, "a", 0.0, 1.0), _reply(2, "b", 0.0, 1.0), _reply(3, "c", 4.0, 1e6)])
    # c's weight is clipped to 2 x the median weight 1: its share is 2 / 4.
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.0))
    assert strategy.history[0]["sites"]["c"]["aggregation_weight"] == 2.0
    assert strategy.history[0]["sites"]["c"]["train"]["weight"] == 1e6


def test_max_weight_ratio_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_weight_ratio"):
        FedShiftStrategy(max_weight_ratio=0.5)


def test_a_zero_weight_is_rejected() -> None:
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 1.0, 1.0), _reply(2, "b", 9.0, 0.0)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.0))
    assert "not a positive" in strategy.history[0]["rejected"]["b"]


def test_fedprox_sends_its_proximal_weight() -> None:
    strategy = FedShiftStrategy(aggregator="fedprox", proximal_mu=0.3, min_available_nodes=1,
                                min_train_nodes=1)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [5]

    messages = list(strategy.configure_train(
        2, ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}), ConfigRecord(), Grid()))
    assert dict(messages[0].content["config"]) == {"proximal-mu": 0.3, "server-round": 2}
    arrays, _ = strategy.aggregate_train(2, [_reply(5, "a", 2.0, 1.0)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.0))


def test_fedadam_moves_towards_the_mean_with_adam_steps() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 2.0, 1.0)])
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
    (np.full(3, 3e38, dtype=np.float32), "exceeds max-update-norm 10"),
])
def test_bad_updates_are_rejected_with_a_reason_and_not_averaged(bad: np.ndarray,
                                                                 reason: str) -> None:
    strategy = _strategy(max_update_norm=10.0)
    arrays, _ = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 1.0), _reply(2, "b", 4.0, 3.0), _reply(3, "bad", 0.0, 3.0, w=bad),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.25))
    entry = strategy.history[0]
    assert reason in entry["rejected"]["bad"]
    assert set(entry["rejected"]) == {"bad"}
    assert entry["sites"]["b"]["update_norm"] == pytest.approx(4.0 * np.sqrt(3))


def test_a_round_with_only_rejected_updates_aggregates_nothing() -> None:
    strategy = _strategy()
    bad = np.array([np.nan, 0.0, 0.0], dtype=np.float32)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 0.0, 1.0, w=bad)])
    assert arrays is None
    assert "NaN" in strategy.history[0]["rejected"]["a"]
    assert "0 usable" in strategy.history[0]["kept_global"]


def test_fewer_usable_updates_than_min_train_nodes_aggregate_nothing() -> None:
    strategy = _strategy()
    strategy.min_train_nodes = 2
    bad = np.array([np.nan, 0.0, 0.0], dtype=np.float32)
    arrays, _ = strategy.aggregate_train(1, [
        _reply(1, "a", 1.0, 1.0), _reply(2, "b", 0.0, 1.0, w=bad), _refusal(3, "over budget")])
    assert arrays is None
    assert set(strategy.history[0]["rejected"]) == {"b"}
    assert strategy.history[0]["refused"] == {"node-3 (train)": "over budget"}


def test_missing_sites_are_named_from_earlier_replies() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(1, "a", 1.0, 1.0), _reply(2, "b", 1.0, 1.0)])
    sent = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in (1, 2, 7)]
    missing = strategy.record_missing(2, "train", sent, [_reply(1, "a", 1.0, 1.0)])
    assert missing == ["b", "node-7"]
    assert strategy.history[-1]["missing"] == {"train": ["b", "node-7"]}


def test_state_round_trip_keeps_history_labels_and_adam_moments() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    strategy.aggregate_train(1, [_reply(1, "a", 2.0, 1.0), _reply(2, "a", 2.0, 1.0)])
    state, arrays = strategy.state()
    assert state["labels"] == {"1": "a", "2": "a@node-2"}
    again = _strategy(aggregator="fedadam", server_lr=0.1)
    again.restore(state, arrays)
    assert again.history == strategy.history
    assert again.labels.as_dict() == {"1": "a", "2": "a@node-2"}
    second = [_reply(1, "a", 3.0, 1.0)]
    np.testing.assert_array_equal(again.aggregate_train(2, second)[0]["w"].numpy(),
                                  strategy.aggregate_train(2, second)[0]["w"].numpy())


def test_evaluation_pools_the_sites_noisy_confusion_counts() -> None:
    strategy = _strategy()
    metrics = strategy.aggregate_evaluate(1, [
        _evaluation(1, "a", [[8.0, 2.0], [-1.0, 3.0]], noise_std=3.0, auroc=0.8),
        _evaluation(2, "b", [[1.0, 1.0], [2.0, 6.0]], noise_std=4.0, auroc=0.6),
        _refusal(3, "evaluation budget spent"),
    ])
    entry = strategy.history[0]
    a = entry["sites"]["a"]["evaluate"]
    # The negative cell counts as 0: a's recalls are 8/10 and 3/3.
    assert a["accuracy"] == pytest.approx(11 / 13)
    assert a["balanced_accuracy"] == pytest.approx((0.8 + 1.0) / 2)
    assert a["confusion"] == [[8.0, 2.0], [-1.0, 3.0]] and a["noise_std"] == 3.0
    assert a["auroc"] == 0.8
    pooled = entry["evaluate"]
    assert pooled["confusion"] == [[9.0, 3.0], [1.0, 9.0]]
    assert pooled["accuracy"] == pytest.approx(18 / 22)
    assert pooled["balanced_accuracy"] == pytest.approx((9 / 12 + 9 / 10) / 2)
    assert pooled["noise_std"] == pytest.approx(5.0)
    assert pooled["sites"] == 2 and pooled["auroc"] == pytest.approx(0.7)
    assert metrics["accuracy"] == pytest.approx(18 / 22)
    assert entry["refused"] == {"node-3 (evaluate)": "evaluation budget spent"}


def test_a_malformed_evaluation_is_rejected_and_the_others_pooled() -> None:
    strategy = _strategy(num_classes=3)
    good = _evaluation(1, "a", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]],
                       accuracy=0.99)
    wrong_size = _evaluation(2, "b", [[1.0, 0.0], [0.0, 1.0]])
    metrics = strategy.aggregate_evaluate(1, [good, wrong_size])
    entry = strategy.history[0]
    assert "confusion must be 9 finite numbers" in entry["rejected"]["b (evaluate)"]
    assert metrics["accuracy"] == 1.0 and entry["evaluate"]["sites"] == 1
    # A site's own exact figure never takes the place of the one from the counts.
    assert entry["sites"]["a"]["evaluate"]["reported-accuracy"] == 0.99


def test_end_round_hands_the_entry_to_on_round() -> None:
    seen: list[int] = []
    strategy = _strategy(on_round=lambda entry: seen.append(entry["round"]))
    strategy.aggregate_train(1, [_reply(1, "a", 1.0, 1.0)])
    strategy.end_round(1)
    assert seen == [1]
