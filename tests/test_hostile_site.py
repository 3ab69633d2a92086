"""A hostile site against the server: the strategy and the shift monitor hold their ground.

Issue 12, findings 7 to 9: a reply must not make the global model one site's by
the weight it claims, must not overflow the aggregation, must not end the
ServerApp by a malformed record, and must not take another site's place in the
records by calling itself by that site's name. Every reply here is crafted by
hand (a hostile site does not use :mod:`common.messages` to write it); the
honest ones are what a site sends.
"""

from __future__ import annotations

from typing import Any

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

from common.label_shift import num_bins
from common.messages import (
    DeploymentReply,
    EvaluateReply,
    MomentsReply,
    TrainReply,
    ValidationReply,
)
from common.norm_moments import MomentLayout
from server.shift_monitor import ShiftMonitor
from server.strategy import FedShiftStrategy

pytestmark = pytest.mark.usefixtures("server_identity")

HONEST = 0.1
"""Every honest site moves every parameter to this value."""
HOSTILE = np.array([49.0, 0.0, 0.0], dtype=np.float32)
"""The hostile site's parameters: an update of norm 49 from the global zeros."""


def _request(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=kind)


def _honest(node: int, name: str | None = None, **extras: float) -> Message:
    reply = TrainReply(arrays=ArrayRecord({"w": Array(np.full(3, HONEST, dtype=np.float32))}),
                       weight=1.0, site=name or f"site-{node}", extras=extras)
    return Message(reply.to_content(), reply_to=_request(node))


def _crafted(node: int, metrics: dict[str, Any], w: np.ndarray | Array = HOSTILE,
             name: str | None = None, **records: Any) -> Message:
    """A train reply written by hand: any metrics, any arrays, any extra records."""
    content = RecordDict({
        "arrays": ArrayRecord({"w": w if isinstance(w, Array) else Array(w)}),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"name": name or f"site-{node}"}),
        **records,
    })
    return Message(content, reply_to=_request(node))


def _strategy(**kwargs: Any) -> FedShiftStrategy:
    strategy = FedShiftStrategy(min_available_nodes=1, min_train_nodes=1, **kwargs)
    strategy._current = {"w": np.zeros(3, dtype=np.float32)}
    return strategy


def _aggregate(strategy: FedShiftStrategy, replies: list[Message]) -> np.ndarray | None:
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else arrays["w"].numpy()


# ------------------------------------------------------------ (a) one site's weight


@pytest.mark.parametrize("claimed", [1e15, 1e9])
def test_a_huge_weight_does_not_make_the_global_model_that_sites(claimed: float) -> None:
    honest = [_honest(n, **{"num-examples": 100.0}) for n in range(1, 6)]
    hostile = _crafted(9, {"weight": claimed, "num-examples": claimed})
    result = _aggregate(_strategy(), [*honest, hostile])
    assert result is not None
    honest_mean = np.full(3, HONEST)
    if claimed > 1e9:
        # Beyond the largest weight a reply may carry: refused outright.
        np.testing.assert_allclose(result, honest_mean, rtol=1e-6)
    else:
        # Within it: clipped to 4 x the median weight, so five honest sites outweigh it.
        np.testing.assert_allclose(result, (5 * honest_mean + 4 * HOSTILE) / 9, rtol=1e-6)
    assert np.linalg.norm(result - honest_mean) < np.linalg.norm(result - HOSTILE)


# ------------------------------------------------------------- (b) weight overflow


def test_two_sites_at_1e308_neither_overflow_nor_zero_the_model() -> None:
    strategy = _strategy()
    replies = [_honest(1), _honest(2),
               *(_crafted(n, {"weight": 1e308, "num-examples": 1e308}) for n in (8, 9))]
    with np.errstate(all="raise"):
        result = _aggregate(strategy, replies)
    assert result is not None and np.all(np.isfinite(result)) and np.any(result != 0)
    np.testing.assert_allclose(result, np.full(3, HONEST), rtol=1e-6)
    assert set(strategy.history[0]["rejected"]) == {"site-8", "site-9"}
    assert "weight" in strategy.history[0]["rejected"]["site-8"]


def test_with_only_the_overflowing_sites_the_global_parameters_are_kept() -> None:
    strategy = _strategy()
    replies = [_crafted(n, {"weight": 1e308, "num-examples": 1e308}) for n in (8, 9)]
    assert _aggregate(strategy, replies) is None
    assert "0 usable update(s)" in strategy.history[0]["kept_global"]


# ------------------------------------------------------- (c) a malformed metric


@pytest.mark.parametrize(("metrics", "reason"), [
    ({"weight": 1.0, "secret": 3.0}, "unknown key(s) 'secret'"),
    ({"weight": 1.0, "train-loss": [1.0, 2.0]}, "train-loss must be a number"),
    ({"weight": 1.0, "train-loss": float("nan")}, "train-loss must be a finite number"),
    ({"num-examples": 10.0}, "weight is missing"),
])
def test_a_malformed_metric_drops_that_reply_and_the_round_goes_on(
        metrics: dict[str, Any], reason: str) -> None:
    strategy = _strategy()
    replies = [_honest(1, **{"train-loss": 0.5}), _crafted(7, metrics),
               _honest(2, **{"train-loss": 0.7})]
    arrays, aggregated = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, HONEST), rtol=1e-6)
    assert aggregated["train-loss"] == pytest.approx(0.6)
    entry = strategy.history[0]
    assert reason in entry["rejected"]["site-7"]
    assert "train" not in entry["sites"].get("site-7", {})


def test_a_malformed_evaluation_drops_that_reply_and_the_others_are_pooled() -> None:
    strategy = _strategy()

    def honest(node: int) -> Message:
        reply = EvaluateReply(confusion=np.array([[5.0, 5.0], [0.0, 10.0]]), noise_std=1.0,
                              site=f"site-{node}")
        return Message(reply.to_content(), reply_to=_request(node, MessageType.EVALUATE))

    hostile = Message(RecordDict({
        "metrics": MetricRecord({"confusion": [5.0, 5.0, 0.0, 10.0],
                                 "confusion-noise-std": 1.0, "accuracy": 1.0,
                                 "num-examples": 20, "secret": 1.0}),
        "site": ConfigRecord({"name": "site-7"})}), reply_to=_request(7, MessageType.EVALUATE))
    strategy.aggregate_evaluate(1, [honest(1), hostile, honest(2)])
    entry = strategy.history[0]
    assert "secret" in entry["rejected"]["site-7 (evaluate)"]
    assert entry["evaluate"]["sites"] == 2
    assert entry["evaluate"]["balanced_accuracy"] == pytest.approx(0.75)


# ------------------------------------------------------ (d) malformed shift replies

LAYOUT = MomentLayout(("a", "b"), clip=0.5)
SUMS_SHAPE = (2, 2, LAYOUT.width)


class ShiftGrid:
    """Three sites answering shift queries; ``replies`` may replace a node's answer."""

    def __init__(self, crafted: dict[int, RecordDict] | None = None,
                 names: dict[int, str] | None = None) -> None:
        self.crafted = crafted or {}
        self.names = names or {}

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages: list[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            name = self.names.get(node, f"s{node}")
            if node in self.crafted:
                content = self.crafted[node]
            elif msg.content["config"]["kind"] == "moments":
                content = MomentsReply(sums=np.full(SUMS_SHAPE, 0.1 * node),
                                       counts=np.array([50.0 * node, 50.0]),
                                       sum_noise_std=1.0, count_noise_std=1.0,
                                       site=name).to_content()
            elif msg.content["config"]["kind"] == "validation":
                hist = np.full((2, num_bins(2)), 5.0)
                content = ValidationReply(val_hist=hist, val_noise_std=1.0,
                                          site=name).to_content()
            else:
                content = DeploymentReply(site=name).to_content()
            replies.append(Message(content, reply_to=msg))
        return replies


def _moments_content(name: str, metrics: dict[str, float] | None = None,
                     summaries: bool = True) -> RecordDict:
    content = MomentsReply(sums=np.zeros(SUMS_SHAPE), counts=np.array([50.0, 50.0]),
                           sum_noise_std=1.0, count_noise_std=1.0, site=name).to_content()
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if not summaries:
        del content["summaries"]
    return content


@pytest.mark.parametrize(("content", "reason"), [
    (_moments_content("s3", summaries=False), "array records [], expected ['summaries']"),
    (_moments_content("s3", {"sum-noise-std": 1.0, "count-noise-std": 1.0, "exact-n": 100}),
     "unknown key(s) 'exact-n'"),
])
def test_a_malformed_moments_reply_is_refused_and_the_round_goes_on(content: RecordDict,
                                                                    reason: str) -> None:
    monitor = ShiftMonitor(ShiftGrid({3: content}), LAYOUT, num_classes=2)
    monitor.moments_round(1, ArrayRecord())
    assert reason in monitor.refused["s3 (moments, round 1)"]
    assert set(monitor.rounds[0]["sites"]) == {"s1", "s2"}


def test_a_malformed_validation_reply_is_refused_and_the_others_are_estimated() -> None:
    hist = ValidationReply(val_hist=np.full((2, num_bins(2)), 5.0), val_noise_std=1.0,
                           site="s3").to_content()
    hist["metrics"] = MetricRecord({"val-noise-std": 1.0, "pool-size": 400})
    monitor = ShiftMonitor(ShiftGrid({3: hist}), LAYOUT, num_classes=2)
    final = monitor.deployment(1, ArrayRecord())
    assert "unknown key(s) 'pool-size'" in monitor.refused["s3 (validation, round 1)"]
    assert set(final["sites"]) == {"s1", "s2"}


# --------------------------------------------------------- (e) a borrowed name


def test_a_node_calling_itself_like_another_site_does_not_overwrite_its_records() -> None:
    strategy = _strategy()
    impostor = _crafted(9, {"weight": 1.0}, w=np.full(3, 0.3, dtype=np.float32),
                        name="site-1")
    strategy.aggregate_train(1, [_honest(1, **{"train-loss": 0.5}), impostor])
    sites = strategy.history[0]["sites"]
    assert sites["site-1"]["node"] == 1 and sites["site-1"]["train"]["train-loss"] == 0.5
    assert sites["site-1@node-9"]["node"] == 9
    # The next round the impostor answers first: it still does not get the name.
    strategy.aggregate_train(2, [impostor, _honest(1, **{"train-loss": 0.4})])
    assert strategy.history[1]["sites"]["site-1"]["train"]["train-loss"] == 0.4
    # Evaluation is recorded under the same labels.
    evaluation = EvaluateReply(confusion=np.eye(2), noise_std=0.0, site="site-1").to_content()
    strategy.aggregate_evaluate(2, [
        Message(evaluation, reply_to=_request(9, MessageType.EVALUATE))])
    assert set(strategy.history[1]["sites"]["site-1@node-9"]) >= {"train", "evaluate"}
    assert "evaluate" not in strategy.history[1]["sites"]["site-1"]


def test_the_shift_monitor_uses_the_strategys_labels() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_honest(1, name="s1"), _honest(2, name="s2")])
    # Node 3 calls itself s1 in its shift replies.
    monitor = ShiftMonitor(ShiftGrid(names={3: "s1"}), LAYOUT, num_classes=2,
                           labels=strategy.labels)
    monitor.moments_round(1, ArrayRecord())
    assert set(monitor.rounds[0]["sites"]) == {"s1", "s2", "s1@node-3"}
    priors = monitor.training_priors()
    np.testing.assert_allclose(priors["s1"], [0.5, 0.5])
    np.testing.assert_allclose(priors["s1@node-3"], [0.75, 0.25])
    assert strategy.state()[0]["labels"] == {"1": "s1", "2": "s2", "3": "s1@node-3"}


def test_a_name_of_the_form_node_id_cannot_take_an_unnamed_nodes_records() -> None:
    strategy = _strategy()
    refusal = Message(Error(code=4001, reason="over budget"), reply_to=_request(3))
    strategy.aggregate_train(1, [refusal, _crafted(9, {"weight": 1.0}, name="node-3")])
    entry = strategy.history[0]
    assert entry["refused"] == {"node-3 (train)": "over budget"}
    assert set(entry["sites"]) == {"node-3@node-9"}


# ------------------------------------------------- (f) bad parameters and records


@pytest.mark.parametrize(("w", "records", "reason"), [
    (np.array([np.nan, 0.0, 0.0], dtype=np.float32), {}, "NaN or infinite"),
    (np.array([np.inf, 0.0, 0.0], dtype=np.float32), {}, "NaN or infinite"),
    (np.zeros(4, dtype=np.float32), {}, "shape"),
    (np.zeros((3, 1), dtype=np.float32), {}, "shape"),
    (np.zeros(3, dtype=np.float64), {}, "dtype"),
    (Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage"), {},
     "malformed reply"),
    (np.zeros(3, dtype=np.float32), {"more": ArrayRecord({"x": Array(np.zeros(1))})},
     "array records"),
])
def test_bad_parameters_are_rejected_and_the_honest_sites_aggregated(
        w: np.ndarray | Array, records: dict[str, Any], reason: str) -> None:
    strategy = _strategy()
    result = _aggregate(strategy, [_honest(1), _crafted(7, {"weight": 1.0}, w=w, **records),
                                   _honest(2)])
    assert result is not None
    np.testing.assert_allclose(result, np.full(3, HONEST), rtol=1e-6)
    assert reason in strategy.history[0]["rejected"]["site-7"]
