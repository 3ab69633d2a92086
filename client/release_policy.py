"""What a site releases and what it lets the server ask of it.

The server is curious: it chooses the run config and the model it sends. A
site's :class:`SitePolicy` comes from the site's own file (deployed sites, as
node config) or from the simulation that builds the site, never from the run
config, and every message is checked against it before anything is computed.

By default a site releases nothing outside its ledger: DP releases only, equal
aggregation weights, no exact loss, count, timing or metric. Each non-DP release
in :data:`common.messages.NON_DP_RELEASES` exists only where the policy names it,
and the ledger records every one that goes out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from client.privacy_ledger import COMPOSITIONS
from common.federation_config import ConfigError, FederationConfig
from common.messages import NON_DP_RELEASES

WEIGHTS = ("equal", "dp-count")


@dataclass(frozen=True)
class SitePolicy:
    """A site's release settings and its limits on what the server may ask.

    Parameters
    ----------
    non_dp : frozenset of str (default: empty)
        Non-DP releases the site allows, by name (keys of
        :data:`common.messages.NON_DP_RELEASES`): ``train-loss``,
        ``example-count``, ``timing``, ``skipped-images``, ``evaluation-metrics``,
        ``audit-metrics``. Each is recorded in the ledger when it goes out.
    weights : str (default: "equal")
        Aggregation weight sent with every update: ``equal`` (1, nothing
        released) or ``dp-count`` (the training record count with Gaussian noise
        of std ``count_noise``, released once per run and charged).
    count_noise : float (default: 10.0)
        Noise std of the DP count (its sensitivity is 1).
    max_evaluations : int (default: 1)
        Evaluate messages the site answers per run (DP-noised confusion counts of
        its test split, charged); the run's plan reserves their cost.
    shift_summaries, label_histograms : bool (default: True)
        Whether the site answers shift queries (DP moment sums with DP class
        counts; DP score histograms). Moment summaries carry class counts, so they
        need both.
    composition : str (default: "sequential")
        How releases on the site's data parts compose; ``parallel-parts`` only
        where no person has records in two parts (see :mod:`client.privacy_ledger`).
    ledger_must_exist : bool (default: False)
        A missing ledger file is an error instead of a new, empty ledger.
    target_sensitivity : float (default: 0.0)
        The site's operating point (binary tasks): the threshold on its calibrated
        scores that keeps at least this sensitivity on its validation split; 0:
        the balanced point (see :mod:`common.operating_point`). Used for its
        local decisions and its exact evaluation metrics (where it releases them by
        name); never released itself.
    own_model_epochs : int (default: 10)
        Epochs of a model the site trains on its own training split alone, without
        DP (it never leaves the site), once per run; the site compares it with the
        federated model on its validation split and decides with the better mix (see
        :mod:`client.own_model`). 0: no own model, decisions by the federated model.
    decide_with_mix : bool (default: False)
        Decide with the mix of the federated and own models that was clearly best on
        the validation split, instead of the federated model alone. Off by default:
        on PneumoniaMNIST the validation split comes from the training images'
        distribution and the test split does not, and the choice made on validation
        lowered the pooled test AUROC (0.934 to 0.927; docs/recipe.md).
    max_image_size, max_local_epochs, max_rounds, max_moment_layers : int
        The largest image size (default 512), local epochs per round (10), rounds
        per run (100) and moment layers (16) a run may ask of the site.
    """

    non_dp: frozenset[str] = frozenset()
    weights: str = "equal"
    count_noise: float = 10.0
    max_evaluations: int = 1
    shift_summaries: bool = True
    label_histograms: bool = True
    composition: str = "sequential"
    ledger_must_exist: bool = False
    target_sensitivity: float = 0.0
    own_model_epochs: int = 10
    decide_with_mix: bool = False
    max_image_size: int = 512
    max_local_epochs: int = 10
    max_rounds: int = 100
    max_moment_layers: int = 16

    def __post_init__(self) -> None:
        unknown = sorted(set(self.non_dp) - set(NON_DP_RELEASES))
        checks = [
            (not unknown, f"unknown non-DP release(s) {', '.join(unknown)}; known: "
                          f"{', '.join(NON_DP_RELEASES)}"),
            (self.weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, "
                                      f"got {self.weights!r}"),
            (math.isfinite(self.count_noise) and self.count_noise > 0,
             f"count_noise must be a finite number > 0, got {self.count_noise}"),
            (self.max_evaluations >= 0,
             f"max_evaluations must be >= 0, got {self.max_evaluations}"),
            (0 <= self.target_sensitivity < 1,
             f"target_sensitivity must lie in (0, 1) (0: the balanced operating point), "
             f"got {self.target_sensitivity}"),
            (self.own_model_epochs >= 0,
             f"own_model_epochs must be >= 0 (0: no own model), got {self.own_model_epochs}"),
            (self.composition in COMPOSITIONS,
             f"composition must be one of {', '.join(COMPOSITIONS)}, got {self.composition!r}"),
            *[(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
              for name in ("max_image_size", "max_local_epochs", "max_rounds",
                           "max_moment_layers")],
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"site policy: {message}")

    def allows(self, release: str) -> bool:
        """Whether the non-DP ``release`` (a key of NON_DP_RELEASES) may go out."""
        return release in self.non_dp

    def check_run(self, cfg: FederationConfig) -> None:
        """Refuse a run that asks more of the site than its limits allow."""
        for asked, limit, key in (
                (cfg.image_size, self.max_image_size, "image-size"),
                (cfg.local_epochs, self.max_local_epochs, "local-epochs"),
                (cfg.num_rounds, self.max_rounds, "num-rounds"),
                (cfg.moment_layers, self.max_moment_layers, "moment-layers")):
            if asked > limit:
                name = f"max_{key.replace('-', '_').removeprefix('num_')}"
                raise ConfigError(
                    f"the run asks {key} = {asked}, but this site allows at most {limit} "
                    f"([limits] {name} in its site file); nothing was computed or sent"
                )

    def to_node_config(self) -> dict[str, str | int | float | bool]:
        """The flat Flower node config that carries this policy to the ClientApp."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_node_key(f.name)] = ",".join(sorted(value)) if f.name == "non_dp" else value
        return out

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy a node config carries; settings it lacks take the defaults."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = _node_key(f.name)
            if key not in node_config:
                continue
            value = node_config[key]
            default = getattr(cls, f.name)
            if f.name == "non_dp":
                kwargs[f.name] = frozenset(v.strip() for v in str(value).split(",") if v.strip())
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"node config {key} must be true or false, got {value!r}")
                kwargs[f.name] = value
            elif isinstance(default, int | float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"node config {key} must be a number, got {value!r}")
                kwargs[f.name] = type(default)(value)
            else:
                kwargs[f.name] = str(value)
        return cls(**kwargs)


def _node_key(name: str) -> str:
    return {"non_dp": "release-non-dp", "weights": "aggregation-weights",
            "shift_summaries": "allow-shift-summaries",
            "label_histograms": "allow-label-histograms"}.get(name, name.replace("_", "-"))
