"""Run settings: validated at the edge with messages a person can act on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.backbones import BackboneError
from common.data.federation import load_federation
from common.federation_config import NONPRIVATE_RECIPE, ConfigError, FederationConfig


@pytest.mark.parametrize("eps", [0.0, -0.5, float("inf")])
def test_epsilon_must_be_a_positive_budget(eps: float) -> None:
    with pytest.raises(ConfigError, match="epsilon must be a finite number > 0"):
        FederationConfig(epsilon=eps)


def test_non_private_runs_need_no_budget() -> None:
    assert not FederationConfig(dp=False, epsilon=0.0).dp


def test_simulated_sites_need_one_prevalence_each_deployed_ones_none() -> None:
    cfg = FederationConfig(num_sites=3)  # a deployment of three sites
    assert cfg.required_sites == 3
    with pytest.raises(ConfigError, match="one per site"):
        load_federation(cfg)


def test_unknown_backbone() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        FederationConfig(backbone="vgg99")


def test_flower_round_trip_and_unknown_keys() -> None:
    cfg = FederationConfig(num_rounds=3, prevalences=(0.1, 0.2, 0.3, 0.4), dp=False)
    assert FederationConfig.from_flower(cfg.to_flower()) == cfg
    with pytest.raises(ConfigError, match="unknown setting 'rounds'"):
        FederationConfig.from_flower({"rounds": 3})
    with pytest.raises(ConfigError, match="batch-size = 'many' is not a valid int"):
        FederationConfig.from_flower({"batch-size": "many"})


def test_a_non_private_run_takes_the_non_private_recipe_where_it_does_not_say_otherwise() -> None:
    private = FederationConfig.from_flower({"dp": True})
    assert (private.optimizer, private.lr) == ("sgd", FederationConfig.lr)
    open_run = FederationConfig.from_flower({"dp": "false"})
    assert {k: getattr(open_run, k) for k in NONPRIVATE_RECIPE} == dict(NONPRIVATE_RECIPE)
    chosen = FederationConfig.from_flower({"dp": False, "lr": 0.01})
    assert (chosen.optimizer, chosen.lr) == (NONPRIVATE_RECIPE["optimizer"], 0.01)


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapt_norm_layers": -1}, "adapt-norm-layers must be >= 0 \\(0: off\\), got -1"),
    ({"adapt_norm_noise": 0.0}, "adapt-norm-noise must be a finite number > 0, got 0.0"),
    ({"adapt_norm_noise": float("inf")}, "adapt-norm-noise must be a finite number > 0"),
    ({"adapt_norm_clip": -0.5}, "adapt-norm-clip must be a finite number > 0, got -0.5"),
    ({"adapt_norm_layers": 2, "mode": "full-gn", "shift": False},
     "adapt-norm-layers re-estimates the frozen normalisation statistics, which transfer "
     "mode 'full-gn' does not keep"),
])
def test_adapted_norm_settings_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FederationConfig(**changes)


def test_adapted_norms_keep_the_shift_summaries_and_round_trip() -> None:
    cfg = FederationConfig(adapt_norm_layers=3, adapt_norm_noise=25.0, adapt_norm_clip=0.4)
    assert cfg.shift  # the summaries read the pretrained statistics, so both can run
    assert FederationConfig(adapt_norm_layers=1, personal_bn=True, shift=False).personal_bn
    assert FederationConfig.from_flower(cfg.to_flower()) == cfg
    assert FederationConfig.from_flower({"adapt-norm-layers": "2"}).adapt_norm_layers == 2
    assert FederationConfig().adapt_norm_layers == 0


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("inf"), float("nan")])
def test_connect_timeout_must_be_a_finite_positive_wait(seconds: float) -> None:
    with pytest.raises(ConfigError, match=r"connect-timeout must be a finite number of "
                                          r"seconds > 0 \(how long the server waits"):
        FederationConfig(connect_timeout=seconds)


def test_connect_timeout_round_trips_and_is_in_the_app_config() -> None:
    assert FederationConfig.from_flower({"connect-timeout": "30"}).connect_timeout == 30.0
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config["connect-timeout"] == FederationConfig().connect_timeout == 120.0
