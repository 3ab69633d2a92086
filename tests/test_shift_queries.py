"""query.shift at a site: DP summaries charged to the right ledger part, refusals."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import shift_queries
from client.app import make_client_app
from client.privacy_ledger import PrivacyLedger
from client.release_policy import SitePolicy
from client.site_config import load_site_config
from client.site_norms import load_statistics
from common.data.federation import load_federation
from common.data.splits import SiteData
from common.federation_config import FederationConfig
from common.frozen_batchnorm import FrozenNorm
from common.messages import ERROR_BAD_REQUEST, ERROR_BUDGET_EXCEEDED
from common.model_surgery import build_model
from common.norm_moments import image_moments, moment_layout
from common.prediction import predict_logits
from common.shift_estimators import SharedCalibration
from common.trainable_arrays import trainable_arrays
from tests.site_files import write_site

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture
def cfg(small_pneumonia_dir: Path, tmp_path: Path) -> FederationConfig:
    return FederationConfig(
        data_dir=str(small_pneumonia_dir), image_size=32, num_sites=2, prevalences=(0.5, 0.6),
        num_rounds=1, batch_size=32, epsilon=1.0, state_dir=str(tmp_path / "state"),
        moment_layers=4,
    )


def _with_pool(cfg: FederationConfig) -> tuple[SiteData, ...]:
    sites = load_federation(cfg)
    return tuple(dataclasses.replace(
        s, images={**s.images, "pool": s.images["test"]},
        labels={**s.labels, "pool": s.labels["test"]}) for s in sites)


def _send(cfg: FederationConfig, message_type: str, config: dict, arrays: ArrayRecord
          ) -> Message:
    app = make_client_app(cfg, _with_pool)
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                  dst_node_id=7, message_type=message_type)
    context = Context(run_id=42, node_id=7, node_config={"partition-id": 1},
                      state=RecordDict(), run_config={})
    return app(msg, context)


def _ledger(cfg: FederationConfig) -> PrivacyLedger:
    return PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", cfg.epsilon, cfg.delta)


def test_moments_are_charged_to_the_train_part_within_the_plan(cfg: FederationConfig) -> None:
    model = build_model(cfg.model_spec())
    arrays = trainable_arrays(model)
    assert not _send(cfg, MessageType.TRAIN, {"server-round": 1}, arrays).has_error()
    reply = _send(cfg, "query.shift", {"kind": "moments", "server-round": 1}, arrays)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    layout = moment_layout(model, cfg.moment_layers, cfg.moment_clip)
    sums = reply.content["summaries"]["sums"].numpy()
    assert sums.shape == (2, len(layout.layer_names), layout.width)
    assert reply.content["summaries"]["counts"].numpy().shape == (2,)
    metrics = reply.content["metrics"]
    assert metrics["sum-noise-std"] == pytest.approx(cfg.moment_noise * layout.sensitivity)
    assert metrics["count-noise-std"] == cfg.moment_noise
    ledger = _ledger(cfg)
    [entry] = [e for e in ledger.entries() if e.mechanism == "moments"]
    assert entry.part == "train"
    assert entry.noise_multiplier == pytest.approx(cfg.moment_noise / math.sqrt(2))
    # The plan reserved this release (and the run's others) before sizing DP-SGD's noise.
    plan = ledger.plan("42")
    assert plan is not None and plan.reservation("moments", "train") is not None
    assert ledger.epsilon_spent() <= cfg.epsilon
    before = ledger.path.read_text()
    again = _send(cfg, "query.shift", {"kind": "moments", "server-round": 2}, arrays)
    assert again.has_error() and again.error.code == ERROR_BUDGET_EXCEEDED
    assert ledger.path.read_text() == before


CALIBRATION = SharedCalibration(1.2, -0.1, (0.4, 0.6),
                                np.array([[0.7, 0.3], [0.3, 0.7]])).to_values()


def test_validation_histogram_and_deployment_estimates_use_their_own_parts(
    cfg: FederationConfig,
) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    app = make_client_app(cfg, _with_pool, SitePolicy(non_dp=frozenset({"audit-metrics"})))

    def ask(config: dict) -> Message:
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                      dst_node_id=7, message_type="query.shift")
        return app(msg, Context(run_id=42, node_id=7, node_config={"partition-id": 1},
                                state=RecordDict(), run_config={}))

    validation = ask({"kind": "validation", "server-round": 1})
    assert not validation.has_error(), validation.error.reason
    assert validation.content["summaries"]["val-hist"].numpy().shape == (2, 8)
    assert validation.content["metrics"]["val-noise-std"] == cfg.histogram_noise
    without = ask({"kind": "deployment", "server-round": 1})
    assert without.has_error() and without.error.code == ERROR_BAD_REQUEST
    reply = ask({"kind": "deployment", "server-round": 1, "calibration": list(CALIBRATION)})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    summaries, metrics = reply.content["summaries"], reply.content["metrics"]
    assert summaries["release.mlls"].numpy().shape == (8,)
    assert summaries["release.bbse"].numpy().shape == (2,)
    ledger = _ledger(cfg)
    [val_entry] = [e for e in ledger.entries() if e.kind == "gaussian" and e.part == "validation"]
    assert (val_entry.mechanism, val_entry.noise_multiplier) == (
        "score-histogram", cfg.histogram_noise)
    deployed = {e.mechanism: e for e in ledger.entries()
                if e.kind == "gaussian" and e.part == "deployment"}
    assert set(deployed) == {"label-shift-mlls", "label-shift-bbse"}
    for name, entry in (("mlls", deployed["label-shift-mlls"]),
                        ("bbse", deployed["label-shift-bbse"])):
        # The noise each release states is its charged multiplier x sensitivity (1), and
        # the two releases together cost one Gaussian mechanism at histogram-noise.
        assert metrics[f"noise-std.{name}"] == pytest.approx(entry.noise_multiplier)
        assert entry.noise_multiplier == pytest.approx(cfg.histogram_noise * math.sqrt(2))
    # Each pool image adds a probability vector to the soft counts: their sum is the pool
    # size plus noise.
    pool = len(_with_pool(cfg)[1].labels["pool"])
    assert abs(summaries["release.bbse"].numpy().sum() - pool) < 6 * math.sqrt(2) * (
        cfg.histogram_noise * math.sqrt(2))
    assert ledger.epsilon_spent("train") == 0.0
    assert [e.allowed_by for e in ledger.entries() if e.kind == "allowed"] == [
        "release audit-metrics"]
    assert {"corrected.nll", "uncorrected.nll", "corrected.ece", "raw.auroc"} <= set(metrics)
    again = ask({"kind": "deployment", "server-round": 2, "calibration": list(CALIBRATION)})
    assert again.has_error() and again.error.code == ERROR_BUDGET_EXCEEDED


def test_unknown_query_kind_is_a_bad_request(cfg: FederationConfig) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg, "query.shift", {"kind": "everything", "server-round": 1}, arrays)
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
    assert "moments, validation, deployment" in reply.error.reason


def test_server_clip_scales_the_noise_not_the_cost_and_bad_centres_cost_nothing(
    cfg: FederationConfig,
) -> None:
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    assert not _send(cfg, MessageType.TRAIN, {"server-round": 1}, arrays).has_error()
    ledger = _ledger(cfg)
    before = ledger.path.read_text()
    for bad in ({"moment-centre": [0.0, 1.0]}, {"moment-clip": -1.0},
                {"moment-centre": [float("nan")] * (2 * 4 * 2)}):
        reply = _send(cfg, "query.shift", {"kind": "moments", "server-round": 1, **bad}, arrays)
        assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
        assert "moment-" in reply.error.reason
        assert ledger.path.read_text() == before
    centre = [0.5] * (2 * 4 * 2)
    reply = _send(cfg, "query.shift", {"kind": "moments", "server-round": 1,
                                       "moment-centre": centre, "moment-clip": 1.2}, arrays)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    wide = moment_layout(build_model(cfg.model_spec()), cfg.moment_layers, 1.2)
    assert reply.content["metrics"]["sum-noise-std"] == pytest.approx(
        cfg.moment_noise * wide.sensitivity)
    [entry] = [e for e in _ledger(cfg).entries() if e.mechanism == "moments"]
    assert entry.noise_multiplier == pytest.approx(cfg.moment_noise / math.sqrt(2))


def test_a_deployed_sites_unlabelled_pool_gets_its_reserved_releases(
        tmp_path: Path) -> None:
    node = load_site_config(write_site(tmp_path, pool=6)).node_config()
    run = FederationConfig(image_size=16, num_rounds=1, moment_layers=4,
                           state_dir=str(tmp_path / "server-state"))
    arrays = trainable_arrays(build_model(run.model_spec()))
    for config in ({"kind": "validation", "server-round": 1},
                   {"kind": "deployment", "server-round": 1, "calibration": list(CALIBRATION)}):
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                      dst_node_id=7, message_type="query.shift")
        reply = make_client_app(run)(msg, Context(run_id=42, node_id=7, node_config=node,
                                                  state=RecordDict(), run_config={}))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["summaries"]["release.mlls"].numpy().shape == (8,)
    ledger = PrivacyLedger(Path(node["ledger-path"]), 1.0, 1e-5)
    assert {(e.part, e.mechanism) for e in ledger.entries()} == {
        ("validation", "score-histogram"), ("deployment", "label-shift-mlls"),
        ("deployment", "label-shift-bbse")}


def test_moments_read_the_pretrained_statistics_and_deployment_the_sites_own(
        cfg: FederationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg.replace(adapt_norm_layers=1, epsilon=2.0)
    model = build_model(cfg.model_spec())
    arrays = trainable_arrays(model)
    first = next(m for m in model.modules() if isinstance(m, FrozenNorm))
    seen: dict[str, torch.Tensor] = {}

    def first_mean(net: torch.nn.Module) -> torch.Tensor:
        return next(m for m in net.modules() if isinstance(m, FrozenNorm)).mean.clone()

    def moments(net: torch.nn.Module, *args: object) -> np.ndarray:
        seen["moments"] = first_mean(net)
        return image_moments(net, *args)

    def logits(net: torch.nn.Module, *args: object) -> np.ndarray:
        seen["deployment"] = first_mean(net)
        return predict_logits(net, *args)

    monkeypatch.setattr(shift_queries, "image_moments", moments)
    monkeypatch.setattr(shift_queries, "predict_logits", logits)
    assert not _send(cfg, MessageType.TRAIN, {"server-round": 1}, arrays).has_error()
    for extra in ({"kind": "moments"},
                  {"kind": "deployment", "calibration": list(CALIBRATION)}):
        reply = _send(cfg, "query.shift", {**extra, "server-round": 1}, arrays)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    kept = load_statistics(Path(cfg.state_dir) / "ledgers" / "adapted-norms" / "site-1-42.npz")
    assert kept is not None
    torch.testing.assert_close(seen["moments"], first.mean)
    np.testing.assert_allclose(seen["deployment"].numpy(), next(iter(kept.values())).mean,
                               rtol=1e-6)
    assert _ledger(cfg).epsilon_spent() <= cfg.epsilon
