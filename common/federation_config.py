"""The settings of a federation run, as one typed, validated dataclass.

Flower carries run settings as a flat mapping of hyphenated keys to str, int,
float or bool (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config``).
:meth:`FederationConfig.from_flower` reads such a mapping (unknown keys are an
error, missing keys take the defaults) and :meth:`to_flower` writes one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.backbones import get_backbone
from common.model_surgery import ModelSpec
from common.transfer_mode import TransferMode

NONPRIVATE_RECIPE: Mapping[str, Any] = MappingProxyType(
    {"optimizer": "adam", "lr": 0.003, "lr_decay": 0.7})
"""What a non-private run (``dp = false``) trains with where it does not say otherwise.

The defaults are DP-SGD's: SGD at lr 1.0 takes steps of at most ``lr * clip``
because every per-sample gradient is clipped. Without clipping and noise those
steps are unbounded, and at lr 0.05 the bn+head model at 64 px stayed at the
class prior's loss; Adam sets its own step size per coordinate, which noise no
longer spoils (docs/recipe.md has the comparison).
"""


class ConfigError(ValueError):
    """A setting has a value fedshift cannot use; the message says which and why."""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class FederationConfig:
    """Settings shared by the server and every site of one run.

    Parameters
    ----------
    dataset : str (default: "pneumoniamnist")
        The simulated sites' data set: a MedMNIST flag (file ``<dataset>.npz``), a
        path to an npz file in MedMNIST layout, ``fashion-mnist`` (Debian package
        ``dataset-fashion-mnist``) or an ImageFolder tree (see
        :func:`common.data.datasets.load_image_dataset`).
    data_dir : str (default: "")
        Directory holding the data file; empty: ``$FEDSHIFT_DATA_DIR``, then ``~/.medmnist``.
    image_size : int (default: 64)
        Images are resized to ``image_size`` x ``image_size``.
    num_classes : int (default: 2)
        Classes of the task; every site's labels must lie in ``[0, num_classes)``.
    in_channels : int (default: 1)
        Channels of the images (1 grey, 3 colour); the input adapter maps them to RGB.
    num_sites : int (default: 4)
        Number of hospitals: simulated ones, or in a deployment the SuperNodes the
        run waits for (see ``min_sites``).
    prevalences : tuple[float, ...] (default: (0.4, 0.6, 0.75, 0.9))
        Per simulated site, the fraction of class 1 (pneumonia) in its splits; one
        value per site. Deployed sites hold their own data and ignore it.
    label_skew : float (default: 0.0)
        Dirichlet concentration alpha of each simulated site's class mix: site class
        distribution q ~ Dirichlet(alpha · C · p) with p the data set's class frequencies
        and C the number of classes (alpha = 1 with balanced classes is Dirichlet(1, ..., 1));
        small alpha gives strongly skewed sites, large alpha near-identical ones. 0 (default):
        binary tasks use ``prevalences``, tasks with more classes give every site the
        data set's own class mix.
    backbone : str (default: "efficientnet_lite0")
        Backbone registry name.
    weights : str (default: "")
        Local pretrained weights file; empty: the backbone's own source.
    mode : str (default: "bn+head")
        Transfer mode.
    num_rounds : int (default: 5)
        Federated rounds; sites plan their noise for this many.
    local_epochs : int (default: 2)
        Local epochs per round.
    batch_size : int (default: 128)
        Expected local batch size.
    lr : float (default: 1.0)
        Local learning rate in round 1 (DP-SGD with clipped per-sample gradients
        of norm ``clip`` takes steps of at most ``lr * clip``). Non-private runs
        default to :data:`NONPRIVATE_RECIPE`'s.
    lr_decay : float (default: 0.8)
        Factor applied to the learning rate each round (round r uses
        ``lr * lr_decay**(r - 1)``): later, noisier updates take smaller steps.
    optimizer : str (default: "sgd")
        Local optimizer: ``sgd`` (momentum 0.9) or ``adam``. Under DP, SGD does
        better here: Adam's per-coordinate scaling blows noise up on the many
        scale/shift coordinates that carry little signal.
    clip : float (default: 0.1)
        Per-sample gradient norm bound.
    dp : bool (default: True)
        Train with DP-SGD; False is a non-private reference.
    epsilon : float (default: 1.0)
        Each site's privacy budget for the whole run.
    delta : float (default: 1e-5)
        Each site's delta.
    aggregator : str (default: "fedavg")
        The server's aggregator: the name of one of Flower's strategies in the
        server's registry (``fedavg``, ``fedadam``, ``fedprox``, ``fedavgm``,
        ``fedmedian``, ``fedtrimmedavg``, ``krum``, ... see
        :mod:`server.aggregators`). The names live with the strategies they build,
        on the server side, so the server checks this one when it builds its
        strategy, before the model or any site; ``fedshift simulate --help`` lists
        them.
    proximal_mu : float (default: 0.01)
        FedProx proximal weight (``fedprox`` only).
    server_lr : float (default: 0.01)
        Server learning rate of ``fedadam``, ``fedyogi`` and ``fedadagrad`` (Flower's ``eta``).
    min_sites : int (default: 0)
        Sites that must be connected for a round to start and must answer for it to
        aggregate; 0 means all ``num_sites``. Below ``num_sites`` the federation goes
        on without sites that are down, time out or run out of budget.
    round_timeout : float (default: 3600.0)
        Seconds the server waits for the sites' replies in each phase of a round;
        sites that have not answered by then are logged as missing.
    connect_timeout : float (default: 120.0)
        Seconds the server waits, before each phase of a round, for
        ``min_sites`` (or ``num_sites``) nodes to be connected; fewer after that and
        the run stops with a message saying what to change.
    max_update_norm : float (default: 50.0)
        Training replies whose parameters moved further than this (L2 norm) from
        the global ones are rejected, as are replies with non-finite values or the
        wrong names, shapes or dtypes; 0 turns the norm bound off.
    seed : int (default: 0)
        Seed of the site partition and of local training.
    state_dir : str (default: "fedshift-state")
        Where the server writes its history and final parameters and simulated
        sites keep their ledgers.
    shift : bool (default: True)
        Query every site for DP shift summaries: normalisation-input moments and a
        label histogram each round, and deployment-pool and validation score
        histograms after the last round (see :mod:`common.covariate_score` and
        :mod:`common.label_shift`).
    moment_noise : float (default: 30.0)
        Noise multiplier of each round's moment release (relative to its
        sensitivity); the rounds' releases together act like one release at
        ``moment_noise / sqrt(num_rounds)``. Sites reserve their cost before training.
    moment_layers : int (default: 7)
        Normalisation layers, evenly spaced through the backbone, whose input
        features (mean offset and spread over all channels) are released: DP
        noise grows with the square root of the number of released values.
    moment_clip : float (default: 0.3)
        Bound on the norm of one image's centred feature block per layer, in units
        of the pretrained statistics.
    scenario : str (default: "")
        Simulation scenario file (TOML) with ground-truth shifts; empty: sites
        split by ``prevalences``. Only ``fedshift simulate`` reads it.
    evaluations : int (default: 1)
        Federated evaluations per run: the last ``evaluations`` rounds end with an
        evaluate message, whose replies are DP-noised confusion counts of each
        site's test split (charged; sites reserve their cost before training, up
        to the number their own configuration allows). 0: no federated evaluation.
    evaluation_noise : float (default: 20.0)
        Noise multiplier (noise std per cell of the confusion counts) of each
        evaluation.
    histogram_noise : float (default: 20.0)
        Noise multiplier (noise std per cell) of the validation and deployment
        score histograms released after the last round.
    personal_bn : bool (default: False)
        FedBN-style personalisation: every site keeps its own BatchNorm scale/shift
        between rounds (on its disk, beside its ledger) and uses them for training
        and evaluation, so only the head and input adapter are shared in effect.
        Shift summaries compare one global model across sites, so they need
        ``shift = false``.
    adapt_norm_layers : int (default: 0)
        Site-adapted normalisation (AdaBN, kept site-local as in FedBN): every site
        re-estimates the statistics of the first ``adapt_norm_layers`` frozen
        normalisation layers from its training images, once per run with its first
        training round, under a Gaussian mechanism charged to its ledger (the run's
        noise plan reserves it; see :mod:`common.norm_adaptation`), keeps them on its
        disk beside its ledger and trains and predicts with them; they never travel.
        The shift summaries still read the pretrained statistics, so they compare
        one global model across sites. 0: off.
    adapt_norm_noise : float (default: 10.0)
        Noise multiplier of each adapted layer's moment sum and of the image count;
        the ``adapt_norm_layers + 1`` releases together cost one Gaussian mechanism
        of multiplier ``adapt_norm_noise / sqrt(adapt_norm_layers + 1)``.
    adapt_norm_clip : float (default: 0.5)
        Bound on the root mean square entry of one image's moment vector (per
        channel: the spatial means of the standardised input and of its square
        minus 1, in units of the pretrained statistics); the vector's L2 bound is
        ``adapt_norm_clip * sqrt(2 * channels)``.
    """

    dataset: str = "pneumoniamnist"
    data_dir: str = ""
    image_size: int = 64
    num_classes: int = 2
    in_channels: int = 1
    num_sites: int = 4
    prevalences: tuple[float, ...] = (0.4, 0.6, 0.75, 0.9)
    label_skew: float = 0.0
    backbone: str = "efficientnet_lite0"
    weights: str = ""
    mode: str = "bn+head"
    num_rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 1.0
    lr_decay: float = 0.8
    optimizer: str = "sgd"
    clip: float = 0.1
    dp: bool = True
    epsilon: float = 1.0
    delta: float = 1e-5
    aggregator: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    min_sites: int = 0
    round_timeout: float = 3600.0
    connect_timeout: float = 120.0
    max_update_norm: float = 50.0
    seed: int = 0
    state_dir: str = "fedshift-state"
    shift: bool = True
    moment_noise: float = 30.0
    moment_layers: int = 7
    moment_clip: float = 0.3
    scenario: str = ""
    evaluations: int = 1
    evaluation_noise: float = 20.0
    histogram_noise: float = 20.0
    personal_bn: bool = False
    adapt_norm_layers: int = 0
    adapt_norm_noise: float = 10.0
    adapt_norm_clip: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable setting."""
        get_backbone(self.backbone)
        try:
            mode = TransferMode.parse(self.mode)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        checks = [
            (self.image_size >= 16, f"image-size must be >= 16, got {self.image_size}"),
            (self.num_classes >= 2, f"num-classes must be >= 2, got {self.num_classes}"),
            (self.in_channels >= 1, f"in-channels must be >= 1, got {self.in_channels}"),
            (self.num_sites >= 1, f"num-sites must be >= 1, got {self.num_sites}"),
            (all(0 <= p <= 1 for p in self.prevalences),
             f"prevalences must lie in [0, 1], got {list(self.prevalences)}"),
            (self.label_skew >= 0 and math.isfinite(self.label_skew),
             f"label-skew must be a finite number >= 0 (0: no Dirichlet skew), "
             f"got {self.label_skew}"),
            (self.num_rounds >= 1, f"num-rounds must be >= 1, got {self.num_rounds}"),
            (self.local_epochs >= 1, f"local-epochs must be >= 1, got {self.local_epochs}"),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.lr_decay <= 1, f"lr-decay must lie in (0, 1], got {self.lr_decay}"),
            (self.optimizer in ("adam", "sgd"),
             f"optimizer must be adam or sgd, got {self.optimizer!r}"),
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (not self.dp or (self.epsilon > 0 and math.isfinite(self.epsilon)),
             f"epsilon must be a finite number > 0 (a privacy budget), got {self.epsilon}; "
             "for a non-private run turn DP off (--no-dp)"),
            (0 < self.delta < 1, f"delta must lie in (0, 1), got {self.delta}"),
            (self.proximal_mu >= 0, f"proximal-mu must be >= 0, got {self.proximal_mu}"),
            (self.server_lr > 0, f"server-lr must be > 0, got {self.server_lr}"),
            (self.moment_noise > 0, f"moment-noise must be > 0, got {self.moment_noise}"),
            (self.moment_layers >= 1,
             f"moment-layers must be >= 1, got {self.moment_layers}"),
            (self.moment_clip > 0, f"moment-clip must be > 0, got {self.moment_clip}"),
            (0 <= self.evaluations <= self.num_rounds,
             f"evaluations must lie in [0, num-rounds={self.num_rounds}], got {self.evaluations}"),
            (self.evaluation_noise > 0 and math.isfinite(self.evaluation_noise),
             f"evaluation-noise must be a finite number > 0, got {self.evaluation_noise}"),
            (self.histogram_noise > 0 and math.isfinite(self.histogram_noise),
             f"histogram-noise must be a finite number > 0, got {self.histogram_noise}"),
            (self.round_timeout > 0,
             f"round-timeout must be > 0 seconds, got {self.round_timeout}"),
            (self.connect_timeout > 0 and math.isfinite(self.connect_timeout),
             f"connect-timeout must be a finite number of seconds > 0 (how long the server "
             f"waits for num-sites, or min-sites, nodes to connect), got {self.connect_timeout}"),
            (self.max_update_norm >= 0,
             f"max-update-norm must be >= 0 (0 turns the bound off), got {self.max_update_norm}"),
            (0 <= self.min_sites <= self.num_sites,
             f"min-sites must lie in [0, num-sites={self.num_sites}], got {self.min_sites}"),
            (not (self.dp and not mode.allows_dp),
             f"transfer mode {self.mode!r} keeps BatchNorm, which DP-SGD cannot train "
             "(a sample's output would depend on its batch); it is a non-private reference: "
             "turn DP off (--no-dp) or choose bn+head, bn, head or partial:K"),
        ]
        checks += [
            (not (self.shift and self.dp and not mode.keeps_frozen_norms),
             f"shift summaries read the pretrained BatchNorm statistics, which transfer mode "
             f"{self.mode!r} replaces; turn shift off (shift = false, --no-shift)"),
            (not (self.shift and self.dp and self.personal_bn),
             "shift summaries compare one global model across sites, but personal-bn gives "
             "every site its own scale/shift; turn shift off (shift = false, --no-shift)"),
            (not (self.personal_bn and not mode.trains_affine),
             f"personal-bn keeps each site's BatchNorm scale/shift, which transfer mode "
             f"{self.mode!r} does not train; use bn+head"),
            (self.adapt_norm_layers >= 0,
             f"adapt-norm-layers must be >= 0 (0: off), got {self.adapt_norm_layers}"),
            (self.adapt_norm_noise > 0 and math.isfinite(self.adapt_norm_noise),
             f"adapt-norm-noise must be a finite number > 0, got {self.adapt_norm_noise}"),
            (self.adapt_norm_clip > 0 and math.isfinite(self.adapt_norm_clip),
             f"adapt-norm-clip must be a finite number > 0, got {self.adapt_norm_clip}"),
            (not (self.adapt_norm_layers and not mode.keeps_frozen_norms),
             f"adapt-norm-layers re-estimates the frozen normalisation statistics, which "
             f"transfer mode {self.mode!r} does not keep; use bn+head, bn, head or partial:K"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` ends with a federated evaluation (the last ``evaluations``)."""
        return server_round > self.num_rounds - self.evaluations

    @property
    def required_sites(self) -> int:
        return self.min_sites or self.num_sites

    @classmethod
    def for_privacy(cls, dp: bool = True, **settings: Any) -> FederationConfig:
        """A config with ``settings``; a non-private one takes :data:`NONPRIVATE_RECIPE`
        for the settings it leaves out."""
        recipe = {} if dp else {k: v for k, v in NONPRIVATE_RECIPE.items() if k not in settings}
        return cls(dp=dp, **recipe, **settings)

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> FederationConfig:
        """Build from a Flower run config (hyphenated keys); unknown keys are an error.

        Missing keys take the defaults, a non-private run's those of
        :data:`NONPRIVATE_RECIPE`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(k.replace("_", "-") for k in fields))
                raise ConfigError(f"unknown setting {key!r}; known settings: {known}")
            kwargs[name] = cls._coerce(name, value)
        return cls.for_privacy(**kwargs)

    @classmethod
    def _coerce(cls, name: str, value: Any) -> Any:
        default = getattr(cls, name)
        try:
            if name == "prevalences":
                return _floats(value) if isinstance(value, str) else tuple(map(float, value))
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    return value.lower() in ("true", "1")
                return bool(value)
            if isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return int(value)
            if isinstance(default, float):
                return float(value)
            return str(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"setting {name.replace('_', '-')} = {value!r} is not a valid "
                f"{type(default).__name__}"
            ) from None

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat mapping with hyphenated keys, as Flower's run config holds it."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prevalences":
                value = ",".join(repr(float(v)) for v in value)
            out[f.name.replace("_", "-")] = value
        return out

    def replace(self, **changes: Any) -> FederationConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def model_spec(self) -> ModelSpec:
        """The model every participant of this run builds."""
        return ModelSpec(
            backbone=self.backbone, num_classes=self.num_classes, in_channels=self.in_channels,
            mode=self.mode, weights=Path(self.weights).expanduser() if self.weights else None,
        )
