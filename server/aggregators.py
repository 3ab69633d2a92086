"""Registry of the server's aggregators: Flower's own strategies, chosen by name.

Every entry is a strategy class from :mod:`flwr.serverapp.strategy` that
aggregates arrays, with the keyword arguments fedshift's run settings give it.
:class:`server.strategy.FedShiftStrategy` wraps the one a run names
(``aggregator`` in the run config, ``--aggregator`` on the command line) and
hands it only replies that passed fedshift's checks.

Flower's array strategies that are not here, and why:

- ``QFedAvg`` reweights by each site's exact training loss, which a fedshift
  site does not release (its releases go through its privacy ledger).
- ``FedXgbBagging`` and ``FedXgbCyclic`` aggregate XGBoost models sent as bytes,
  not arrays.

To add an aggregator, register an :class:`Aggregator` naming its class and the
settings it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.registry import Registry

FEDAVGM_MOMENTUM = 0.9
"""Server momentum of ``fedavgm`` (Hsu et al. 2019). Flower's default, 0, with its
default server learning rate 1 makes FedAvgM FedAvg itself."""


class AggregatorError(ValueError):
    """An aggregator name that is not registered."""


@dataclass(frozen=True)
class AggregatorSettings:
    """The run settings an aggregator may read.

    Attributes
    ----------
    proximal_mu : float
        FedProx's proximal weight, sent to the sites.
    server_lr : float
        The server learning rate (``eta``) of the adaptive optimisers.
    """

    proximal_mu: float = 0.0
    server_lr: float = 0.01


def _no_options(settings: AggregatorSettings) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Aggregator:
    """How to build one of Flower's strategies from fedshift's settings.

    Attributes
    ----------
    name : str
        Registry name (the ``aggregator`` value).
    strategy : type[FedAvg]
        The Flower strategy class.
    summary : str
        One line on what it does, for help texts.
    options : Callable[[AggregatorSettings], dict[str, Any]]
        The strategy's own keyword arguments from the run settings.
    """

    name: str
    strategy: type[FedAvg]
    summary: str
    options: Callable[[AggregatorSettings], dict[str, Any]] = field(default=_no_options)

    def build(self, settings: AggregatorSettings, **sampling: Any) -> FedAvg:
        """The strategy, with ``sampling`` (fractions, minimum node counts, keys) passed on."""
        return self.strategy(**sampling, **self.options(settings))


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", AggregatorError)
register_aggregator = AGGREGATORS.register
get_aggregator = AGGREGATORS.lookup


def _server_lr(settings: AggregatorSettings) -> dict[str, Any]:
    return {"eta": settings.server_lr}


register_aggregator(Aggregator(
    "fedavg", FedAvg, "weighted mean of the sites' parameters (McMahan et al. 2017)"))
register_aggregator(Aggregator(
    "fedprox", FedProx, "FedAvg, the sites adding a proximal term of weight proximal-mu",
    lambda s: {"proximal_mu": s.proximal_mu}))
register_aggregator(Aggregator(
    "fedadam", FedAdam, "server-side Adam step of size server-lr (Reddi et al. 2021)",
    _server_lr))
register_aggregator(Aggregator(
    "fedyogi", FedYogi, "server-side Yogi step of size server-lr (Reddi et al. 2021)",
    _server_lr))
register_aggregator(Aggregator(
    "fedadagrad", FedAdagrad, "server-side Adagrad step of size server-lr (Reddi et al. 2021)",
    _server_lr))
register_aggregator(Aggregator(
    "fedavgm", FedAvgM, f"FedAvg with server momentum {FEDAVGM_MOMENTUM}",
    lambda s: {"server_momentum": FEDAVGM_MOMENTUM}))
register_aggregator(Aggregator(
    "fedmedian", FedMedian, "coordinate-wise median of the sites' parameters"))
register_aggregator(Aggregator(
    "fedtrimmedavg", FedTrimmedAvg, "coordinate-wise mean without the highest and lowest fifth"))
register_aggregator(Aggregator(
    "krum", Krum, "the one update closest to its neighbours (Blanchard et al. 2017)"))
register_aggregator(Aggregator(
    "multikrum", MultiKrum,
    "mean of the updates closest to their neighbours (by Flower's default one update, as krum)"))
register_aggregator(Aggregator(
    "bulyan", Bulyan, "Multi-Krum selection, then a coordinate-wise trimmed mean "
    "(needs at least 3 updates)"))
