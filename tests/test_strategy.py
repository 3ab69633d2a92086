"""FedShiftStrategy: Flower's strategies behind the reply checks, bounded weights, evaluation,
per-site records, refusals and the aggregator's state between rounds."""

from __future__ import annotations

import flwr.serverapp.strategy as flower_strategies
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
from flwr.serverapp.strategy import FedAdam, FedAvg

from common.messages import EvaluateReply, TrainReply
from server.aggregators import AGGREGATORS, AggregatorError
from server.reply_checks import bound_weights
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


class _Grid:
    """Connected nodes 1 to 9, for the aggregator to sample from."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, 10))


def _sent(strategy: FedShiftStrategy, server_round: int = 1,
          w: np.ndarray | None = None) -> list[Message]:
    """Send the round's train messages (global parameters ``w``, default zeros)."""
    w = np.zeros(3, dtype=np.float32) if w is None else w
    return list(strategy.configure_train(server_round, ArrayRecord({"w": Array(w)}),
                                         ConfigRecord(), _Grid()))


def _strategy(**kwargs: object) -> FedShiftStrategy:
    """A strategy that has sent round 1's global parameters, zeros."""
    strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=1, **kwargs)
    _sent(strategy)
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


def test_fedadam_is_flowers_with_its_bias_corrected_step() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "a", 2.0, 1.0)])
    # First Adam step: m = 0.1 d, v = 0.01 d^2, and Flower scales the step size by
    # sqrt(1 - beta_2^t) / (1 - beta_1^t) with t = server round + 1.
    step = 0.1 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    expected = step * 0.2 / (np.sqrt(0.01 * 4.0) + 1e-3)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, expected), rtol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32


def test_an_unknown_aggregator_is_named_with_the_choices() -> None:
    with pytest.raises(AggregatorError, match="unknown aggregator 'median'; choose one of: "
                       "bulyan, fedadagrad, fedadam, fedavg, fedavgm, fedmedian, "
                       "fedprox, fedtrimmedavg, fedyogi, krum, multikrum"):
        FedShiftStrategy(aggregator="median")


NOT_AGGREGATORS = {"QFedAvg", "FedXgbBagging", "FedXgbCyclic"}
"""Flower's FedAvg-derived strategies that fedshift cannot offer (server.aggregators says why)."""


def test_every_flower_strategy_that_aggregates_arrays_is_registered() -> None:
    offered = {name for name in flower_strategies.__all__
               if isinstance(cls := getattr(flower_strategies, name), type)
               and issubclass(cls, FedAvg)}
    registered = {a.strategy.__name__ for a in AGGREGATORS.values()}
    assert offered - NOT_AGGREGATORS == registered
    assert {"fedavg", "fedadam", "fedprox", "fedavgm", "fedmedian", "fedtrimmedavg",
            "krum"} <= set(AGGREGATORS)


VALUES = (1.0, 2.0, 2.5, 4.0, 9.0)
"""Five sites' parameters (every coordinate alike), equal weights."""
EXPECTED = {"fedavg": 3.7, "fedprox": 3.7, "fedmedian": 2.5, "krum": 2.5, "multikrum": 2.5,
            "fedtrimmedavg": (2.0 + 2.5 + 4.0) / 3, "bulyan": 3.7}
"""What the aggregators without server state make of :data:`VALUES`: the mean, the
median, the mean without the lowest and highest fifth, and Krum's most central
update (its three nearest neighbours are closest: 2.5)."""


def _round(strategy: FedShiftStrategy, server_round: int, offset: float = 0.0
           ) -> np.ndarray | None:
    arrays, _ = strategy.aggregate_train(server_round, [
        _reply(node, f"s{node}", value + offset, 1.0) for node, value in enumerate(VALUES, 1)])
    return None if arrays is None else arrays["w"].numpy()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_registered_aggregator_aggregates_the_checked_replies(name: str) -> None:
    strategy = _strategy(aggregator=name)
    result = _round(strategy, 1)
    assert result is not None and result.dtype == np.float32
    if name in EXPECTED:
        np.testing.assert_allclose(result, np.full(3, EXPECTED[name]), rtol=1e-6)
    else:  # a server optimiser steps from the global zeros towards the sites
        assert np.all(np.isfinite(result)) and np.all(result > 0)
        assert len(set(result.tolist())) == 1
    assert strategy.history[0]["kept_global"] is None
    assert set(strategy.history[0]["sites"]) == {f"s{n}" for n in range(1, 6)}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_malformed_replies_are_dropped_with_reasons_for_every_aggregator(name: str) -> None:
    honest = _strategy(aggregator=name)
    expected = _round(honest, 1)
    strategy = _strategy(aggregator=name)
    malformed = [
        _reply(7, "nan", 0.0, 1.0, w=np.array([np.nan, 0, 0], dtype=np.float32)),
        _reply(8, "shape", 0.0, 1.0, w=np.zeros(4, dtype=np.float32)),
        Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"weight": 1.0})}),
                reply_to=Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN)),
    ]
    arrays, _ = strategy.aggregate_train(1, [
        *malformed, *(_reply(n, f"s{n}", v, 1.0) for n, v in enumerate(VALUES, 1))])
    np.testing.assert_array_equal(arrays["w"].numpy(), expected)
    rejected = strategy.history[0]["rejected"]
    assert "NaN" in rejected["nan"] and "shape" in rejected["shape"]
    assert set(rejected) == {"nan", "shape", "node-9"}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_a_restored_aggregator_goes_on_exactly(name: str) -> None:
    strategy = _strategy(aggregator=name, server_lr=0.1)
    first = _round(strategy, 1)
    state, arrays = strategy.state()
    again = FedShiftStrategy(aggregator=name, server_lr=0.1, min_available_nodes=1,
                             min_train_nodes=1)
    again.restore(state, arrays)
    assert again.history == strategy.history
    for each in (strategy, again):
        _sent(each, 2, w=first)
    np.testing.assert_array_equal(_round(again, 2, offset=0.5), _round(strategy, 2, offset=0.5))


def test_the_default_aggregate_is_the_bounded_weighted_float64_mean_as_before() -> None:
    """fedavg behind the checks gives, bit for bit, what fedshift computed before it
    used Flower's FedAvg: the float64 mean under bounded weights, cast to float32."""
    rng = np.random.default_rng(3)
    for sites in (2, 3, 7, 12):
        current = rng.normal(size=(4, 5)).astype(np.float32)
        updates = [current + rng.normal(scale=0.1, size=(4, 5)).astype(np.float32)
                   for _ in range(sites)]
        weights = rng.uniform(1.0, 600.0, size=sites)
        strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=1)
        strategy.configure_train(1, ArrayRecord({"w": Array(current)}), ConfigRecord(), _Grid())
        arrays, _ = strategy.aggregate_train(1, [
            _reply(node, f"s{node}", 0.0, float(weight), w=update)
            for node, (update, weight) in enumerate(zip(updates, weights, strict=True), 1)])
        bounded = bound_weights(weights, 4.0)
        before = np.zeros(current.shape, dtype=np.float64)
        for update, factor in zip(updates, bounded / bounded.sum(), strict=True):
            before += factor * update.astype(np.float64)
        np.testing.assert_array_equal(arrays["w"].numpy(), before.astype(np.float32))


class _Overflowing(FedAdam):
    """Flower's FedAdam whose aggregate is infinite."""

    def aggregate_train(self, server_round: int, replies: object
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        assert arrays is not None
        return ArrayRecord({k: Array(np.full_like(a.numpy(), np.inf))
                            for k, a in arrays.items()}), metrics


def test_a_refused_aggregate_keeps_the_global_parameters_and_undoes_the_aggregators_step(
        ) -> None:
    strategy = FedShiftStrategy(_Overflowing(min_available_nodes=1, min_train_nodes=1,
                                             weighted_by_key="weight"))
    _sent(strategy)
    assert _round(strategy, 1) is None
    assert "not finite" in strategy.history[0]["kept_global"]
    assert strategy.aggregator.m_t is None and strategy.aggregator.v_t is None
    assert strategy.state()[1].keys() == {"current_arrays/dict/w"}


def test_sampling_settings_go_to_a_strategy_passed_in_not_beside_it() -> None:
    with pytest.raises(ValueError, match="min_train_nodes"):
        FedShiftStrategy(FedAdam(), min_train_nodes=1)


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
    strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=2)
    _sent(strategy)
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
    missing = strategy.rounds.record_missing(2, "train", sent, [_reply(1, "a", 1.0, 1.0)])
    assert missing == ["b", "node-7"]
    assert strategy.history[-1]["missing"] == {"train": ["b", "node-7"]}


def test_state_round_trip_keeps_history_labels_and_adam_moments() -> None:
    strategy = _strategy(aggregator="fedadam", server_lr=0.1)
    strategy.aggregate_train(1, [_reply(1, "a", 2.0, 1.0), _reply(2, "a", 2.0, 1.0)])
    state, arrays = strategy.state()
    assert state["labels"] == {"1": "a", "2": "a@node-2"}
    assert {"m_t/dict/w", "v_t/dict/w"} <= arrays.keys()
    again = _strategy(aggregator="fedadam", server_lr=0.1)
    again.restore(state, arrays)
    assert again.history == strategy.history
    assert again.labels.as_dict() == {"1": "a", "2": "a@node-2"}
    second = [_reply(1, "a", 3.0, 1.0)]
    np.testing.assert_array_equal(again.aggregate_train(2, second)[0]["w"].numpy(),
                                  strategy.aggregate_train(2, second)[0]["w"].numpy())


def test_state_of_another_aggregator_or_format_is_refused() -> None:
    strategy = _strategy(aggregator="fedadam")
    with pytest.raises(ValueError, match="'m/w' is not state of FedAdam"):
        strategy.restore({}, {"m/w": np.zeros(3)})
    with pytest.raises(ValueError, match="is not state of FedAvg"):
        _strategy().restore({}, {"momentum_vector/list/0": np.zeros(3)})


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
    strategy.rounds.end_round(1)
    assert seen == [1]
