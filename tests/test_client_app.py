"""The ClientApp: DP training charged to the ledger, refusals as error replies."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import site_work
from client.app import make_client_app
from client.local_training import LocalTrainingConfig, steps_per_round, train_locally
from client.personal_params import personal_names
from client.privacy_ledger import PrivacyLedger
from client.release_policy import SitePolicy
from client.site_norms import load_statistics
from client.site_runtime import resolve_site
from client.site_work import evaluate_site, site_model
from common.data.federation import load_federation
from common.federation_config import ConfigError, FederationConfig
from common.frozen_batchnorm import FrozenNorm
from common.messages import (
    ERROR_BAD_REQUEST,
    ERROR_BUDGET_EXCEEDED,
    ERROR_NOT_ALLOWED,
    ERROR_SITE_DATA,
    Request,
)
from common.model_surgery import build_model
from common.norm_adaptation import adaptation_release, estimate_statistics
from common.prediction import calibrated_predictions
from common.privacy_accounting import GaussianRelease, certify, epsilon_spent
from common.trainable_arrays import trainable_arrays
from tests.site_files import write_class_tree

pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture
def cfg(small_pneumonia_dir: Path, tmp_path: Path) -> FederationConfig:
    return FederationConfig(
        data_dir=str(small_pneumonia_dir), image_size=32, num_sites=2, prevalences=(0.5, 0.6),
        num_rounds=1, batch_size=32, epsilon=2.0, state_dir=str(tmp_path / "state"),
    )


def _send(cfg: FederationConfig, message_type: str, arrays: ArrayRecord, round_: int,
          node_config: dict | None = None, run_id: int = 42, **config: str) -> Message:
    app = make_client_app(cfg)
    msg = Message(
        content=RecordDict({"arrays": arrays,
                            "config": ConfigRecord({"server-round": round_, **config})}),
        dst_node_id=7, message_type=message_type,
    )
    context = Context(run_id=run_id, node_id=7, node_config=node_config or {"partition-id": 1},
                      state=RecordDict(), run_config={})
    return app(msg, context)


def test_train_reply_carries_only_trainable_arrays_and_an_equal_weight(
    cfg: FederationConfig,
) -> None:
    initial = trainable_arrays(build_model(cfg.model_spec()))
    reply = _send(cfg, MessageType.TRAIN, initial, 1)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content["arrays"].keys()) == set(initial.keys())
    assert dict(reply.content["metrics"]) == {"weight": 1.0}
    ledger = PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", 2.0, cfg.delta)
    [entry] = [e for e in ledger.entries() if e.kind == "gaussian"]
    plan = ledger.plan("42")
    assert plan is not None and entry.noise_multiplier == plan.noise_multiplier
    assert entry.steps == plan.steps_per_round > 0
    # The plan reserved every other release of the run before sizing DP-SGD's noise:
    # the whole run spends at most the budget, as PRV certifies it (RDP would not).
    whole = [GaussianRelease(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round),
             *[r.release(r.releases) for r in plan.reserved]]
    certified = certify(whole, cfg.delta)
    assert 0.95 * cfg.epsilon < certified.epsilon <= cfg.epsilon < epsilon_spent(whole, cfg.delta)
    assert plan.accountant == certified.accountant == entry.accountant == "prv"
    assert {r.mechanism for r in plan.reserved} == {"moments", "evaluation", "score-histogram"}


def test_round_beyond_the_budget_is_refused_and_nothing_is_spent(cfg: FederationConfig) -> None:
    initial = trainable_arrays(build_model(cfg.model_spec()))
    assert not _send(cfg, MessageType.TRAIN, initial, 1).has_error()
    ledger_path = Path(cfg.state_dir) / "ledgers" / "site-1.json"
    before = ledger_path.read_text()
    reply = _send(cfg, MessageType.TRAIN, initial, 2)
    assert reply.has_error()
    assert reply.error.code == ERROR_BUDGET_EXCEEDED
    assert "noise plan covers 1 rounds" in reply.error.reason
    assert ledger_path.read_text() == before


def test_training_settings_that_break_the_noise_plan_are_refused(cfg: FederationConfig) -> None:
    # Same number of steps, but each example sampled twice as often as the ledger
    # would record: it must be refused, not silently undercharged.
    planned = cfg.replace(num_rounds=2, local_epochs=1, batch_size=16)
    changed = planned.replace(local_epochs=2, batch_size=32)
    n = len(load_federation(cfg)[1].labels["train"])
    steps = [steps_per_round(n, LocalTrainingConfig(epochs=c.local_epochs,
                                                    batch_size=c.batch_size))
             for c in (planned, changed)]
    assert steps[0] == steps[1]
    initial = trainable_arrays(build_model(cfg.model_spec()))
    assert not _send(planned, MessageType.TRAIN, initial, 1).has_error()
    ledger_path = Path(cfg.state_dir) / "ledgers" / "site-1.json"
    before = ledger_path.read_text()
    reply = _send(changed, MessageType.TRAIN, initial, 2)
    assert reply.error.code == ERROR_BAD_REQUEST
    assert "noise plan" in reply.error.reason
    assert ledger_path.read_text() == before


def test_evaluation_is_dp_by_default_and_exact_metrics_only_where_the_site_allows_them(
        cfg: FederationConfig) -> None:
    initial = trainable_arrays(build_model(cfg.model_spec()))
    dp = _send(cfg, MessageType.EVALUATE, initial, 1)
    assert set(dp.content["metrics"].keys()) == {"confusion", "confusion-noise-std"}
    assert dp.content["metrics"]["confusion-noise-std"] == cfg.evaluation_noise
    ledger = PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", 2.0, cfg.delta)
    [entry] = ledger.entries()
    assert (entry.part, entry.mechanism, entry.noise_multiplier) == (
        "test", "evaluation", cfg.evaluation_noise)
    allowed = _send(cfg, MessageType.EVALUATE, initial, 1,
                    {"partition-id": 0, "release-non-dp": "evaluation-metrics"})
    assert {"accuracy", "balanced_accuracy", "auroc", "num-examples"} <= set(
        allowed.content["metrics"].keys())
    other = PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-0.json", 2.0, cfg.delta)
    assert [e.allowed_by for e in other.entries() if e.kind == "allowed"] == [
        "release evaluation-metrics"]


def test_arrays_for_another_model_are_refused(cfg: FederationConfig) -> None:
    head_only = trainable_arrays(build_model(cfg.replace(mode="head").model_spec()))
    reply = _send(cfg, MessageType.TRAIN, head_only, 1)
    assert reply.error.code == ERROR_BAD_REQUEST
    assert "same backbone and transfer mode" in reply.error.reason
    assert not (Path(cfg.state_dir) / "ledgers" / "site-1.json").exists() or not [
        e for e in PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", 2.0,
                                 cfg.delta).entries() if e.kind == "gaussian"]


def test_the_servers_run_key_keeps_the_ledger_on_one_run_across_flower_runs(
        cfg: FederationConfig) -> None:
    cfg = cfg.replace(num_rounds=2)
    initial = trainable_arrays(build_model(cfg.model_spec()))
    first = _send(cfg, MessageType.TRAIN, initial, 1, run_id=42, **{"run-key": "abc"})
    # The server crashed; the resumed run is a new Flower run with the same run key.
    second = _send(cfg, MessageType.TRAIN, initial, 2, run_id=43, **{"run-key": "abc"})
    assert not first.has_error() and not second.has_error()
    ledger = PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", 2.0, cfg.delta)
    entries = ledger.entries()
    assert {e.run for e in entries} == {"abc"} and [e.round for e in entries] == [1, 2]
    assert entries[0].noise_multiplier == entries[1].noise_multiplier


def test_a_deployed_site_skips_unreadable_images_and_says_how_many(
        cfg: FederationConfig, tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_class_tree(root / "test", {"normal": 6, "pneumonia": 6})
    write_class_tree(root / "train", {"normal": 6, "pneumonia": 6}, seed=1)
    write_class_tree(root / "val", {"normal": 3, "pneumonia": 3}, seed=2)
    (root / "train" / "normal" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "test" / "pneumonia" / "empty.png").write_bytes(b"")
    node = {"site-name": "st-test", "data-path": str(root), "data-format": "imagefolder",
            "epsilon": 2.0, "delta": 1e-5, "ledger-path": str(tmp_path / "ledger.json"),
            "release-non-dp": "skipped-images,evaluation-metrics"}
    reply = _send(cfg, MessageType.EVALUATE, trainable_arrays(build_model(cfg.model_spec())),
                  1, node)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["skipped-images"] == 2
    assert reply.content["metrics"]["num-examples"] == 12


def test_shift_queries_are_refused_where_the_site_does_not_allow_them(
        cfg: FederationConfig) -> None:
    initial = trainable_arrays(build_model(cfg.model_spec()))
    for key in ("allow-shift-summaries", "allow-label-histograms"):
        reply = _send(cfg, "query.shift", initial, 1, {"partition-id": 1, key: False},
                      kind="moments")
        assert reply.error.code == ERROR_NOT_ALLOWED
        setting = key.removeprefix("allow-").replace("-", "_")
        assert f"{setting} = false" in reply.error.reason
    assert not (Path(cfg.state_dir) / "ledgers" / "site-1.json").exists()


def test_a_site_whose_data_cannot_be_read_says_so_and_spends_nothing(
        cfg: FederationConfig, tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "normal").mkdir(parents=True)
    (root / "normal" / "scan.png").write_bytes(b"not an image")
    ledger = tmp_path / "ledger.json"
    node = {"site-name": "st-test", "data-path": str(root), "data-format": "imagefolder",
            "epsilon": 2.0, "delta": 1e-5, "ledger-path": str(ledger)}
    reply = _send(cfg, MessageType.TRAIN, trainable_arrays(build_model(cfg.model_spec())), 1,
                  node)
    assert reply.error.code == ERROR_SITE_DATA
    assert str(root) in reply.error.reason and "st-test" in reply.error.reason
    assert not ledger.exists()


def test_a_personal_bn_site_keeps_its_own_scale_shift_and_evaluates_with_them(
    cfg: FederationConfig,
) -> None:
    cfg = cfg.replace(personal_bn=True, shift=False, num_rounds=2, dp=False)
    model = build_model(cfg.model_spec())
    initial = trainable_arrays(model)
    first = _send(cfg, MessageType.TRAIN, initial, 1, **{"run-key": "r1"})
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    [saved] = (Path(cfg.state_dir) / "personal").glob("site-1-r1.npz")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # only the site's account reads it
    with np.load(saved) as kept:
        names = set(kept.files)
        trained = {k: kept[k] for k in kept.files}
    assert names == set(personal_names(model)) and len(names) == 98
    # The server's next arrays carry other scale/shift values (the average); the
    # site evaluates with its own, so scrambling the global ones changes nothing.
    sent = first.content["arrays"]
    scrambled = ArrayRecord({k: Array(np.full_like(v.numpy(), 7.0) if k in names else v.numpy())
                             for k, v in sent.items()})
    node = {"partition-id": 1, "release-non-dp": "evaluation-metrics"}
    own = _send(cfg, MessageType.EVALUATE, sent, 1, node, **{"run-key": "r1"})
    other = _send(cfg, MessageType.EVALUATE, scrambled, 1, node, **{"run-key": "r1"})
    assert own.content["metrics"]["loss"] == pytest.approx(other.content["metrics"]["loss"])
    for key, value in trained.items():
        np.testing.assert_array_equal(value, sent[key].numpy())
    # Another run starts from the global scale/shift.
    fresh = _send(cfg, MessageType.EVALUATE, scrambled, 1, node, **{"run-key": "r2"})
    assert fresh.content["metrics"]["loss"] != pytest.approx(own.content["metrics"]["loss"])


def test_a_dp_count_weight_is_released_once_per_run_and_charged(cfg: FederationConfig) -> None:
    cfg = cfg.replace(num_rounds=2)
    node = {"partition-id": 1, "aggregation-weights": "dp-count", "count-noise": 5.0}
    initial = trainable_arrays(build_model(cfg.model_spec()))
    first = _send(cfg, MessageType.TRAIN, initial, 1, node)
    second = _send(cfg, MessageType.TRAIN, initial, 2, node)
    ledger = PrivacyLedger(Path(cfg.state_dir) / "ledgers" / "site-1.json", 2.0, cfg.delta)
    [count] = [e for e in ledger.entries() if e.mechanism == "count"]
    assert (count.part, count.noise_multiplier) == ("train", 5.0)
    n = len(load_federation(cfg)[1].labels["train"])
    weight = first.content["metrics"]["weight"]
    assert weight == count.value == second.content["metrics"]["weight"]
    assert abs(weight - n) < 40  # 8 noise standard deviations
    plan = ledger.plan("42")
    assert plan is not None and plan.reservation("count", "train") is not None
    assert ledger.epsilon_spent() <= 2.0


@pytest.mark.parametrize("target", [0.0, 0.95])
def test_evaluation_counts_depend_on_the_test_split_only_the_operating_point_stays_local(
        cfg: FederationConfig, target: float) -> None:
    # The counts are DP for the test split: a site's operating point, fitted on its
    # validation split, must not move them (one validation record could move the
    # threshold and many counts), but the site still decides at it locally.
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    rigged = {k: v.numpy().copy() for k, v in arrays.items()}
    bias = next(k for k in rigged if k.endswith("bias") and rigged[k].shape == (2,))
    rigged[bias] = np.array([0.0, 60.0], dtype=rigged[bias].dtype)
    record = ArrayRecord({k: Array(v) for k, v in rigged.items()})
    site = resolve_site(cfg.replace(dp=False), {"partition-id": 0}, "run",
                        policy=SitePolicy(target_sensitivity=target))
    request = Request(server_round=1, run_key="run")
    reply = evaluate_site(site, record, request)
    assert reply.noise_std == 0 and reply.confusion.sum() == len(site.data.labels["test"])
    assert reply.confusion[:, 0].sum() == 0  # the global model's argmax: all class 1
    site.data.labels["val"] = 1 - site.data.labels["val"]
    np.testing.assert_array_equal(evaluate_site(site, record, request).confusion,
                                  reply.confusion)
    site.data.labels["val"] = 1 - site.data.labels["val"]
    own = calibrated_predictions(site_model(site, record), site.data.images["val"],
                                 site.data.labels["val"], site.data.images["test"],
                                 site.device, target)
    assert 0 < own.decisions.sum() < len(own.decisions)


def _first_norms(model: torch.nn.Module, count: int) -> list[tuple[str, FrozenNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenNorm)][:count]


def test_adapted_statistics_are_charged_once_kept_at_the_site_used_and_never_sent(
        cfg: FederationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg.replace(num_rounds=2, adapt_norm_layers=2)
    model = build_model(cfg.model_spec())
    initial = trainable_arrays(model)
    pretrained = {n: m.mean.clone() for n, m in _first_norms(model, 2)}
    trained_with: list[dict[str, np.ndarray]] = []

    def recording(net: torch.nn.Module, *args: object, **kwargs: object) -> object:
        trained_with.append({n: m.mean.numpy().copy() for n, m in _first_norms(net, 3)})
        return train_locally(net, *args, **kwargs)

    monkeypatch.setattr(site_work, "train_locally", recording)
    first = _send(cfg, MessageType.TRAIN, initial, 1)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    ledger_path = Path(cfg.state_dir) / "ledgers" / "site-1.json"
    ledger = PrivacyLedger(ledger_path, 2.0, cfg.delta)
    [charged] = [e for e in ledger.entries() if e.mechanism == "norm-statistics"]
    assert (charged.part, charged.round) == ("train", 1)
    assert charged.release == adaptation_release(cfg.adapt_norm_noise, 2)
    kept = load_statistics(ledger_path.parent / "adapted-norms" / "site-1-42.npz")
    assert kept is not None and set(kept) == set(pretrained)
    for name, stats in kept.items():
        assert not np.allclose(stats.mean, pretrained[name].numpy(), atol=1e-3)
        # Training ran with the site's statistics in the adapted layers, pretrained after.
        np.testing.assert_allclose(trained_with[0][name], stats.mean, rtol=1e-6)
    third = _first_norms(model, 3)[2]
    np.testing.assert_array_equal(trained_with[0][third[0]], third[1].mean.numpy())
    # They are buffers: the reply carries the trainable arrays and nothing of them.
    sent = first.content["arrays"]
    assert set(sent.keys()) == set(initial.keys())
    for array in sent.values():
        for stats in kept.values():
            for value in (stats.mean, stats.var):
                assert array.numpy().shape != value.shape or not np.allclose(
                    array.numpy(), value, rtol=1e-4)
    # The next round reuses them: nothing estimated or charged again.
    before = (ledger_path.parent / "adapted-norms" / "site-1-42.npz").read_bytes()
    assert not _send(cfg, MessageType.TRAIN, sent, 2).has_error()
    ledger = PrivacyLedger(ledger_path, 2.0, cfg.delta)
    assert len(ledger.made("42", "norm-statistics")) == 1
    assert (ledger_path.parent / "adapted-norms" / "site-1-42.npz").read_bytes() == before
    np.testing.assert_allclose(trained_with[1][next(iter(kept))], next(iter(kept.values())).mean,
                               rtol=1e-6)
    # The site predicts with them; the shared reference model keeps the pretrained ones.
    site = resolve_site(cfg, {"partition-id": 1}, "42")
    for name, norm in _first_norms(site_work.site_model(site, sent), 2):
        np.testing.assert_allclose(norm.var.numpy(), kept[name].var, rtol=1e-6)
    for name, norm in _first_norms(site_work.reference_model(site, sent), 2):
        np.testing.assert_array_equal(norm.mean, pretrained[name])
    assert ledger.epsilon_spent() <= 2.0


def test_the_noise_plan_reserves_the_adapted_statistics_and_the_run_still_fits(
        cfg: FederationConfig, tmp_path: Path) -> None:
    plain = resolve_site(cfg, {"partition-id": 1}, "42")
    adapting = resolve_site(cfg.replace(adapt_norm_layers=3, adapt_norm_noise=10.0,
                                        state_dir=str(tmp_path / "other")),
                            {"partition-id": 1}, "42")
    plans = [site_work.noise_plan(site) for site in (plain, adapting)]
    assert plans[0].reservation("norm-statistics", "train") is None
    reserved = plans[1].reservation("norm-statistics", "train")
    assert reserved is not None and reserved.releases == 1
    assert reserved.release() == adaptation_release(10.0, 3)
    # Its cost leaves less for DP-SGD, whose noise grows; the whole run still fits.
    assert plans[1].noise_multiplier > plans[0].noise_multiplier
    for plan in plans:
        whole = [GaussianRelease(plan.noise_multiplier, plan.sample_rate,
                                 plan.steps_per_round * plan.planned_rounds),
                 *[r.release(r.releases) for r in plan.reserved]]
        assert 0.95 * cfg.epsilon < certify(whole, cfg.delta).epsilon <= cfg.epsilon


def test_adapted_statistics_are_estimated_exactly_without_dp(cfg: FederationConfig) -> None:
    cfg = cfg.replace(adapt_norm_layers=2, dp=False, shift=False)
    initial = trainable_arrays(build_model(cfg.model_spec()))
    assert not _send(cfg, MessageType.TRAIN, initial, 1).has_error()
    kept = load_statistics(Path(cfg.state_dir) / "adapted-norms" / "site-1-42.npz")
    site = resolve_site(cfg, {"partition-id": 1}, "42")
    exact = estimate_statistics(site_work.reference_model(site, initial), 2,
                                site.data.images["train"], cfg.adapt_norm_clip, None,
                                np.random.default_rng(0), torch.device("cpu"))
    assert kept is not None and set(kept) == set(exact)
    for name in exact:
        np.testing.assert_allclose(kept[name].mean, exact[name].mean, rtol=1e-9)


def test_adapted_statistics_are_refused_where_the_run_or_the_site_cannot_back_them(
        cfg: FederationConfig) -> None:
    cfg = cfg.replace(num_rounds=2, adapt_norm_layers=1)
    initial = trainable_arrays(build_model(cfg.model_spec()))
    # Evaluating before the site has estimated them: it says why.
    early = _send(cfg, MessageType.EVALUATE, initial, 1, run_id=41)
    assert early.error.code == ERROR_BAD_REQUEST
    assert "estimates with its first training round" in early.error.reason
    # A plan fixed for other settings: the estimate would not be what was reserved.
    site = resolve_site(cfg, {"partition-id": 1}, "42")
    plan = site_work.noise_plan(site)
    noisier = resolve_site(cfg.replace(adapt_norm_noise=2 * cfg.adapt_norm_noise),
                           {"partition-id": 1}, "42")
    with pytest.raises(ConfigError, match="restore the run's adapt-norm settings"):
        site_work.adapt_norms(noisier, initial, plan, 1)
    # Charged, then lost: the plan holds no budget to estimate them again.
    assert not _send(cfg, MessageType.TRAIN, initial, 1).has_error()
    (Path(cfg.state_dir) / "ledgers" / "adapted-norms" / "site-1-42.npz").unlink()
    lost = _send(cfg, MessageType.TRAIN, initial, 2)
    assert lost.error.code == ERROR_BUDGET_EXCEEDED
    assert "is gone" in lost.error.reason
