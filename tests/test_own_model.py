"""A site's own model and its choice of mix: the maths against a direct computation, the
site's side (trained once per run, kept, never moving what it releases)."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from sklearn.metrics import log_loss

from client import own_model as own_model_module
from client.own_model import decision_model, own_model_path
from client.release_policy import SitePolicy
from client.site_runtime import resolve_site
from client.site_work import evaluate_site, site_model
from common.federation_config import ConfigError, FederationConfig
from common.messages import Request
from common.model_blend import BlendedModel, blend_logits, choose_blend
from common.model_surgery import build_model
from common.operating_point import fit_calibration
from common.trainable_arrays import trainable_arrays


def _scores(rng: np.random.Generator, labels: np.ndarray, separation: float) -> np.ndarray:
    """Binary logits whose class-1 margin is ``separation`` * (2y - 1) plus unit noise."""
    margin = separation * (2 * labels - 1) + rng.normal(size=len(labels))
    return np.stack([np.zeros_like(margin), margin], axis=1)


def test_a_mix_replaces_the_federated_model_only_for_a_clear_gain() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    sharp, blind = _scores(rng, labels, 3.0), _scores(rng, labels, 0.0)
    assert choose_blend(sharp, blind, labels).weight == 1.0
    alone = choose_blend(blind, sharp, labels)
    assert alone.alone_is_better and alone.weight <= 0.25
    same = choose_blend(sharp, sharp.copy(), labels)
    assert same.weight == 1.0 and not same.alone_is_better


def test_two_models_with_independent_errors_mix_below_either_loss() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    first, second = _scores(rng, labels, 1.0), _scores(rng, labels, 1.0)
    choice = choose_blend(first, second, labels)
    assert 0 < choice.weight < 1
    assert choice.losses[choice.weight] < min(choice.federated_loss, choice.local_loss) - 0.01


def test_the_losses_are_calibrated_log_losses_of_the_mixed_log_probabilities() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    federated, local = _scores(rng, labels, 1.5), _scores(rng, labels, 0.7)
    choice = choose_blend(federated, local, labels)
    for weight, loss in choice.losses.items():
        mixed = (weight * torch.log_softmax(torch.from_numpy(federated), 1)
                 + (1 - weight) * torch.log_softmax(torch.from_numpy(local), 1)).numpy()
        probs = fit_calibration(mixed, labels).probs(mixed)
        assert loss == pytest.approx(log_loss(labels, probs, labels=[0, 1]), rel=1e-6)


def test_the_blended_model_gives_the_chosen_mix() -> None:
    torch.manual_seed(0)
    federated, local = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    images = torch.randn(7, 5)
    with torch.no_grad():
        expected = blend_logits(federated(images).double().numpy(),
                                local(images).double().numpy(), 0.25)
        got = BlendedModel(federated, local, 0.25)(images).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_mismatched_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="same images"):
        choose_blend(np.zeros((3, 2)), np.zeros((4, 2)), np.zeros(3, dtype=int))


@pytest.fixture
def cfg(small_pneumonia_dir: Path, tmp_path: Path) -> FederationConfig:
    return FederationConfig(
        data_dir=str(small_pneumonia_dir), image_size=32, num_sites=2, prevalences=(0.5, 0.6),
        num_rounds=1, batch_size=32, dp=False, state_dir=str(tmp_path / "state"),
    )


def test_a_site_trains_its_own_model_once_per_run_keeps_it_and_mixes_only_if_asked(
        cfg: FederationConfig, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    site = resolve_site(cfg, {"partition-id": 0}, "run", policy=SitePolicy(own_model_epochs=2))
    federated = site_model(site, trainable_arrays(build_model(cfg.model_spec())))
    decider, choice = decision_model(site, federated)
    assert choice is not None and choice.validation_size == len(site.data.labels["val"])
    kept = own_model_path(site.files_dir, site.name, "run")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # it never leaves the site
    # An untrained head against a model trained on the site's data: alone is better,
    # the site's log says so, and by default it still decides with the federated model.
    assert choice.alone_is_better and decider is federated
    assert "alone it would do clearly better there" in caplog.text
    assert "decide_with_mix = true" in caplog.text

    def retrain(*_: object) -> None:
        raise AssertionError("the kept model was trained again")

    monkeypatch.setattr(own_model_module, "train_own_model", retrain)
    mixing = replace(site, policy=SitePolicy(own_model_epochs=2, decide_with_mix=True))
    decider, again = decision_model(mixing, federated)
    assert again == choice and isinstance(decider, BlendedModel)
    assert decider.weight == choice.weight < 1


def test_without_an_own_model_the_site_decides_with_the_federated_model(
        cfg: FederationConfig) -> None:
    site = resolve_site(cfg, {"partition-id": 0}, "run", policy=SitePolicy(own_model_epochs=0))
    federated = site_model(site, trainable_arrays(build_model(cfg.model_spec())))
    assert decision_model(site, federated) == (federated, None)
    assert not own_model_path(site.files_dir, site.name, "run").exists()


def test_the_released_counts_do_not_depend_on_the_training_split(
        cfg: FederationConfig) -> None:
    # The own model learns from the training split, which the DP counts of the test
    # split do not cover: flipping every training label must leave them unchanged.
    arrays = trainable_arrays(build_model(cfg.model_spec()))
    record = ArrayRecord({k: Array(v.numpy().copy()) for k, v in arrays.items()})
    policy = SitePolicy(own_model_epochs=2, decide_with_mix=True,
                        non_dp=frozenset({"evaluation-metrics"}))
    request = Request(server_round=1, run_key="run")
    counts, metrics = [], []
    for run in ("a", "b"):
        site = resolve_site(cfg.replace(state_dir=f"{cfg.state_dir}-{run}"),
                            {"partition-id": 0}, "run", policy=policy)
        if run == "b":
            site.data.labels["train"] = 1 - site.data.labels["train"]
        reply = evaluate_site(site, record, request)
        counts.append(reply.confusion)
        metrics.append(reply.extras["auroc"])
    np.testing.assert_array_equal(counts[0], counts[1])
    assert metrics[0] != metrics[1]  # the site's own decisions did use its own model


def test_a_negative_number_of_own_model_epochs_is_refused() -> None:
    with pytest.raises(ConfigError, match="own_model_epochs"):
        SitePolicy(own_model_epochs=-1)
