"""A curious server against a site: crafted messages get nothing the ledger does not cover.

The server chooses the run config and the model it sends. Each test sends the
ClientApp what such a server could send and checks the reply and the ledger: no
exact loss, count, step count, sample rate or metric goes out by default; every
release is charged; epsilon recomputed apart from the product, composing every
entry sequentially by an accountant of the kind that certified the ledger (RDP,
or Google's PLD where PRV did), never exceeds the site's budget; nothing the
server names becomes a path; refused work writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.privacy_ledger import PrivacyLedger
from common.federation_config import FederationConfig
from common.messages import ERROR_BAD_REQUEST, ERROR_BUDGET_EXCEEDED, ERROR_SITE_DATA
from common.model_surgery import build_model
from common.trainable_arrays import trainable_arrays
from tests.independent_accountant import epsilon_as

pytestmark = pytest.mark.usefixtures("server_identity")

BUDGET = 1.0


@pytest.fixture
def cfg(small_pneumonia_dir: Path, tmp_path: Path) -> FederationConfig:
    return FederationConfig(
        data_dir=str(small_pneumonia_dir), image_size=32, num_sites=2, prevalences=(0.5, 0.6),
        num_rounds=1, batch_size=32, epsilon=BUDGET, state_dir=str(tmp_path / "state"),
    )


def _ledger_path(cfg: FederationConfig) -> Path:
    return Path(cfg.state_dir) / "ledgers" / "site-1.json"


def _send(cfg: FederationConfig, message_type: str, arrays: ArrayRecord, round_: int,
          node_config: dict | None = None, **config: object) -> Message:
    msg = Message(
        content=RecordDict({"arrays": arrays,
                            "config": ConfigRecord({"server-round": round_, **config})}),
        dst_node_id=7, message_type=message_type,
    )
    context = Context(run_id=42, node_id=7, node_config=node_config or {"partition-id": 1},
                      state=RecordDict(), run_config={})
    return make_client_app(cfg)(msg, context)


def _reply_keys(reply: Message) -> set[str]:
    assert not reply.has_error(), reply.error.reason
    return {f"{name}/{key}" for name, record in
            [*reply.content.metric_records.items(), *reply.content.config_records.items()]
            for key in record}


def _independent_epsilon(cfg: FederationConfig) -> float:
    """Every DP entry of the ledger file, composed sequentially by an accountant apart from
    the product's, of the kind that certified the ledger's epsilon."""
    data = json.loads(_ledger_path(cfg).read_text())
    releases = [(e["noise_multiplier"], e["sample_rate"], e["steps"])
                for e in data["releases"] if e["kind"] == "gaussian"]
    return epsilon_as(data["guarantee"]["accountant"], releases, cfg.delta)


def test_a_rigged_model_learns_no_loss_and_no_count_from_training(cfg: FederationConfig) -> None:
    # The attack of the review: a head biased to class 0 and no learning, so an exact
    # training loss would tell whether one record is of class 1.
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    rigged = {k: v.numpy().copy() for k, v in arrays.items()}
    bias = next(k for k in rigged if k.endswith("bias") and rigged[k].shape == (2,))
    rigged[bias] = np.array([60.0, 0.0], dtype=rigged[bias].dtype)
    reply = _send(cfg.replace(lr=1e-9), MessageType.TRAIN,
                  ArrayRecord({k: Array(v) for k, v in rigged.items()}), 1)
    assert _reply_keys(reply) == {"metrics/weight", "site/name"}
    assert reply.content["metrics"]["weight"] == 1.0
    assert 0 < _independent_epsilon(cfg) <= BUDGET


def test_a_whole_run_stays_within_the_budget_by_an_independent_accountant(
        cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    replies = [
        _send(cfg, MessageType.TRAIN, arrays, 1),
        _send(cfg, "query.shift", arrays, 1, kind="moments"),
        _send(cfg, MessageType.EVALUATE, arrays, 1),
        _send(cfg, "query.shift", arrays, 1, kind="validation"),
    ]
    allowed = {"metrics/weight", "metrics/confusion", "metrics/confusion-noise-std",
               "metrics/sum-noise-std", "metrics/count-noise-std", "metrics/val-noise-std",
               "site/name"}
    for reply in replies:
        assert _reply_keys(reply) <= allowed
    ledger = PrivacyLedger(_ledger_path(cfg), BUDGET, cfg.delta)
    assert {(e.mechanism, e.part) for e in ledger.entries()} == {
        ("dp-sgd", "train"), ("moments", "train"), ("evaluation", "test"),
        ("score-histogram", "validation")}
    assert all(e.kind == "gaussian" for e in ledger.entries())
    spent = _independent_epsilon(cfg)
    assert 0.9 * BUDGET < spent <= BUDGET
    assert ledger.epsilon_spent() == pytest.approx(spent, rel=0.02)
    # Sequential composition: the site's epsilon is not its largest part's.
    assert ledger.epsilon_spent() > max(ledger.epsilon_spent(p) for p in
                                        ("train", "validation", "test")) + 0.01
    # Every further query is refused and writes nothing.
    before = _ledger_path(cfg).read_bytes()
    for message_type, round_, extra in ((MessageType.EVALUATE, 2, {}),
                                        (MessageType.TRAIN, 2, {}),
                                        ("query.shift", 2, {"kind": "moments"}),
                                        ("query.shift", 3, {"kind": "validation"})):
        reply = _send(cfg, message_type, arrays, round_, **extra)
        assert reply.error.code == ERROR_BUDGET_EXCEEDED, reply.error.reason
    assert _ledger_path(cfg).read_bytes() == before


def test_a_request_answered_already_gets_the_same_reply_and_no_new_charge(
        cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    first = _send(cfg, MessageType.TRAIN, arrays, 1, **{"run-key": "resumed"})
    before = _ledger_path(cfg).read_bytes()
    # The server crashed after the round and resumes it: it asks again, with any model.
    other = ArrayRecord({k: Array(v.numpy() + 1) for k, v in arrays.items()})
    again = _send(cfg, MessageType.TRAIN, other, 1, **{"run-key": "resumed"})
    assert not again.has_error()
    for key, value in first.content["arrays"].items():
        np.testing.assert_array_equal(again.content["arrays"][key].numpy(), value.numpy())
    assert _ledger_path(cfg).read_bytes() == before


@pytest.mark.parametrize("run_key", ["../../../../outside", "a/b", "x" * 65, "y" * 1_000_000])
def test_run_keys_that_could_name_files_or_grow_the_ledger_are_refused(
        cfg: FederationConfig, tmp_path: Path, run_key: str) -> None:
    cfg = cfg.replace(personal_bn=True, shift=False)
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg, MessageType.TRAIN, arrays, 1, **{"run-key": run_key})
    assert reply.error.code == ERROR_BAD_REQUEST
    assert "run-key" in reply.error.reason and len(reply.error.reason) < 400
    assert not Path(cfg.state_dir).exists()
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(("setting", "value", "limit"), [
    ("image_size", 1024, "max_image_size"), ("local_epochs", 50, "max_local_epochs"),
    ("num_rounds", 500, "max_rounds"), ("moment_layers", 40, "max_moment_layers")])
def test_runs_beyond_the_sites_limits_are_refused_before_any_work(
        cfg: FederationConfig, setting: str, value: int, limit: str) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg.replace(**{setting: value}), MessageType.TRAIN, arrays, 1)
    assert reply.error.code == ERROR_BAD_REQUEST
    assert f"[limits] {limit}" in reply.error.reason
    assert not Path(cfg.state_dir).exists()


def test_unknown_request_keys_are_refused(cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg, MessageType.TRAIN, arrays, 1, **{"return-loss": True})
    assert reply.error.code == ERROR_BAD_REQUEST and "return-loss" in reply.error.reason
    assert not Path(cfg.state_dir).exists()


def test_a_missing_ledger_the_site_says_exists_is_an_error_not_zero(
        cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg, MessageType.TRAIN, arrays, 1,
                  {"partition-id": 1, "ledger-must-exist": True})
    assert reply.error.code == ERROR_SITE_DATA
    assert "missing" in reply.error.reason and "backup" in reply.error.reason
    assert not _ledger_path(cfg).exists()


def test_parallel_composition_only_where_the_site_declares_disjoint_parts(
        cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    node = {"partition-id": 1, "composition": "parallel-parts"}
    assert not _send(cfg, MessageType.TRAIN, arrays, 1, node).has_error()
    assert not _send(cfg, MessageType.EVALUATE, arrays, 1, node).has_error()
    declared = PrivacyLedger(_ledger_path(cfg), BUDGET, cfg.delta, "parallel-parts")
    assert declared.epsilon_spent() == pytest.approx(declared.epsilon_spent("train"))
    # Read without the declaration, the same ledger composes sequentially.
    undeclared = PrivacyLedger(_ledger_path(cfg), BUDGET, cfg.delta)
    assert undeclared.epsilon_spent() > declared.epsilon_spent()
