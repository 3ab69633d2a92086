"""Registry of the training methods a study compares, with one uniform runner.

Every method takes the same :class:`FederationConfig`, the same simulated sites
(same splits, same seed) and the same per-site budget, and writes the same
results as :func:`simulations.runner.simulate`. A method is the federated
runner or a baseline (:mod:`simulations.baselines`) plus the settings it changes.

When a study cell has epsilon = inf, DP is off and ``NONPRIVATE`` applies: the
product's non-private recipe (:data:`common.federation_config.NONPRIVATE_RECIPE`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.federation_config import NONPRIVATE_RECIPE, ConfigError, FederationConfig
from common.registry import Registry
from simulations.baselines import run_centralised, run_local_only
from simulations.runner import SimulatedSites, simulate

Results = dict[str, Any]
MethodRunner = Callable[[FederationConfig, SimulatedSites, Path | None], Results]

NONPRIVATE: Mapping[str, Any] = {"dp": False, **NONPRIVATE_RECIPE}


def _federated(cfg: FederationConfig, sites: SimulatedSites, out_dir: Path | None) -> Results:
    return simulate(cfg, out_dir, simulated=sites)


def _local_only(cfg: FederationConfig, sites: SimulatedSites, out_dir: Path | None) -> Results:
    return run_local_only(cfg, sites.sites, out_dir)


def _centralised(cfg: FederationConfig, sites: SimulatedSites, out_dir: Path | None) -> Results:
    return run_centralised(cfg, sites.sites, out_dir)


@dataclass(frozen=True)
class Method:
    """A way to train, as a study runs it.

    Attributes
    ----------
    name : str
        Registry name (what a study file lists).
    summary : str
        One line for tables and plots.
    run : MethodRunner
        Runs the method for a config and sites; returns (and writes) its results.
    settings : Mapping[str, Any]
        FederationConfig changes the method makes (e.g. ``mode = "head"``).
    """

    name: str
    summary: str
    run: MethodRunner
    settings: Mapping[str, Any] = field(default_factory=dict)

    def config(self, base: FederationConfig, private: bool,
               overrides: Mapping[str, Any] | None = None) -> FederationConfig:
        """``base`` with the method's settings, the non-private ones when not
        ``private``, then a study's ``overrides`` for this method."""
        changes = {**self.settings, **({} if private else NONPRIVATE), **(overrides or {})}
        try:
            return base.replace(**changes)
        except TypeError as exc:
            raise ConfigError(f"method {self.name}: {exc}") from None


METHODS: Registry[Method] = Registry("method", ConfigError)
register_method = METHODS.register
get_method = METHODS.lookup


register_method(Method(
    "fedshift", "federated bn+head (BatchNorm scale/shift + head)", _federated))
register_method(Method(
    "local", "local-only: each site alone at its own budget", _local_only))
register_method(Method(
    "central", "centralised: all training data pooled at one holder", _centralised))
register_method(Method(
    "head", "federated head-only (linear probe)", _federated, {"mode": "head"}))
register_method(Method(
    "fedbn", "FedBN: site-local scale/shift, shared head", _federated, {"personal_bn": True}))
register_method(Method(
    "gn-full", "federated full fine-tuning, BatchNorm -> GroupNorm", _federated,
    {"mode": "full-gn"}))
