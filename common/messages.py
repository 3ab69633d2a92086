"""Typed records for every message between the server and a site, both directions.

Flower carries a message as a ``RecordDict`` of named records holding flat
string keys. This module is the one place those keys are written: the server
builds requests and parses replies with it, a site parses requests and builds
replies with it. Parsing checks every field on arrival and refuses unknown keys,
with a :class:`MessageError` that names the field and what was expected, so a
malformed message from either side is refused with a reason instead of raising
somewhere inside Flower.

What a site may put in a reply is fixed here too. Every value is either a DP
release the site's ledger charges (parameters trained by DP-SGD, noised counts,
sums and histograms) or data-independent (its name, an equal aggregation
weight), or it is one of the named non-DP releases in :data:`NON_DP_RELEASES`,
which a site sends only where its own configuration turns that release on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SUMMARIES = "summaries"

# Request config keys (server -> site).
SERVER_ROUND = "server-round"
RUN_KEY = "run-key"
PROXIMAL_MU = "proximal-mu"
KIND = "kind"
MOMENT_CENTRE = "moment-centre"
MOMENT_CLIP = "moment-clip"
CALIBRATION = "calibration"

SHIFT_QUERY_TYPE = "query.shift"
SHIFT_KINDS = ("moments", "validation", "deployment")

# Codes of a site's refusals (Flower ``Error`` replies); the reason says why.
ERROR_BUDGET_EXCEEDED = 4001
ERROR_BAD_REQUEST = 4002
ERROR_SITE_DATA = 4003
ERROR_NOT_ALLOWED = 4004
ERROR_SITE_WORKER = 4005
"""The site's worker process could not be reached or did not answer."""


@dataclass(frozen=True)
class Refusal:
    """A request a site refuses: one of the codes above and the reason, for a person."""

    code: int
    reason: str

RUN_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a run key may be: it names files and ledger entries at the site."""

SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_WEIGHT = 1e9
"""Largest aggregation weight a reply may carry (a count of images)."""

NON_DP_RELEASES: dict[str, tuple[str, ...]] = {
    "train-loss": ("train-loss",),
    "example-count": ("num-examples",),
    "timing": ("compute-seconds",),
    "skipped-images": ("skipped-images",),
    "evaluation-metrics": ("accuracy", "balanced_accuracy", "auroc", "loss", "num-examples"),
    "audit-metrics": ("raw.", "uncorrected.", "corrected."),
}
"""Each non-DP release a site file can turn on by name, and the reply keys it adds
(a key ending in ``.`` is a prefix)."""


class MessageError(ValueError):
    """A message's content does not have the fields, types or values expected."""


def _fail(what: str, field_name: str, problem: str) -> MessageError:
    return MessageError(f"{what}: {field_name} {problem}")


def _number(record: Mapping[str, Any], key: str, what: str, *, low: float = -math.inf,
            high: float = math.inf, required: bool = True, integer: bool = False
            ) -> float | None:
    if key not in record:
        if required:
            raise _fail(what, key, "is missing")
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(what, key, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _fail(what, key, f"must be a finite number in [{low:g}, {high:g}], got {value!r}")
    if integer and float(value) != int(value):
        raise _fail(what, key, f"must be a whole number, got {value!r}")
    return float(value)


def _no_unknown(record: Mapping[str, Any], known: set[str], what: str,
                prefixes: tuple[str, ...] = ()) -> None:
    unknown = sorted(k for k in record if k not in known and not k.startswith(prefixes))
    if unknown:
        raise MessageError(f"{what}: unknown key(s) {', '.join(map(repr, unknown[:5]))}; "
                           f"known: {', '.join(sorted(known)) or 'none'}")


_EXTRA_KEYS = [k for keys in NON_DP_RELEASES.values() for k in keys]
ALL_EXTRA_KEYS = {k for k in _EXTRA_KEYS if not k.endswith(".")}
ALL_EXTRA_PREFIXES = tuple(k for k in _EXTRA_KEYS if k.endswith("."))
"""Reply keys (exact, prefixes) some named non-DP release may add."""


def check_run_key(key: str) -> str:
    """``key`` if it is a usable run key, else :class:`MessageError`."""
    if not RUN_KEY_PATTERN.fullmatch(key):
        shown = key if len(key) <= 80 else f"{key[:40]}... ({len(key)} characters)"
        raise MessageError(f"run-key {shown!r} must be 1 to 64 letters, digits, '_' or '-'")
    return key


# --------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """What a site reads from a message's ``config`` record.

    ``run_key`` names the run in the site's ledger: the server's ``run-key``
    (kept across a server restart), else Flower's run id. ``kind``,
    ``moment_centre``, ``moment_clip`` and ``calibration`` (the federation's
    :class:`common.shift_estimators.SharedCalibration` values, sent with a
    ``deployment`` query) belong to shift queries only; ``proximal_mu`` to training
    only.
    """

    server_round: int
    run_key: str
    proximal_mu: float = 0.0
    kind: str = ""
    moment_centre: tuple[float, ...] | None = None
    moment_clip: float | None = None
    calibration: tuple[float, ...] | None = None

    def to_config(self) -> ConfigRecord:
        out: dict[str, Any] = {SERVER_ROUND: self.server_round, RUN_KEY: self.run_key}
        if self.proximal_mu:
            out[PROXIMAL_MU] = self.proximal_mu
        if self.kind:
            out[KIND] = self.kind
        if self.moment_centre is not None:
            out[MOMENT_CENTRE] = list(self.moment_centre)
        if self.moment_clip is not None:
            out[MOMENT_CLIP] = self.moment_clip
        if self.calibration is not None:
            out[CALIBRATION] = list(self.calibration)
        return ConfigRecord(out)

    @classmethod
    def parse(cls, message_type: str, content: RecordDict | None, default_run_key: str
              ) -> Request:
        """The request a message of ``message_type`` carries in ``content`` (None: no
        content); :class:`MessageError` when it is malformed."""
        what = f"{message_type} request"
        if content is None or CONFIG not in content.config_records:
            raise MessageError(f"{what}: the message has no {CONFIG!r} record")
        config = content.config_records[CONFIG]
        shift = message_type == SHIFT_QUERY_TYPE
        known = {SERVER_ROUND, RUN_KEY}
        known |= {KIND, MOMENT_CENTRE, MOMENT_CLIP, CALIBRATION} if shift else {PROXIMAL_MU}
        _no_unknown(config, known, what)
        round_ = _number(config, SERVER_ROUND, what, low=1, high=1e6, integer=True)
        key = config.get(RUN_KEY, default_run_key)
        if not isinstance(key, str):
            raise _fail(what, RUN_KEY, f"must be text, got {type(key).__name__}")
        mu = _number(config, PROXIMAL_MU, what, low=0, high=1e3, required=False) or 0.0
        kind = ""
        centre = None
        clip = None
        calibration = None
        if shift:
            kind = config.get(KIND, "")
            if kind not in SHIFT_KINDS:
                raise _fail(what, KIND, f"must be one of {', '.join(SHIFT_KINDS)}, got {kind!r}")
            clip = _number(config, MOMENT_CLIP, what, low=1e-6, high=1e3, required=False)
            if MOMENT_CENTRE in config:
                centre = _finite_list(config[MOMENT_CENTRE], what, MOMENT_CENTRE)
            if CALIBRATION in config:
                calibration = _finite_list(config[CALIBRATION], what, CALIBRATION)
        if ARRAYS not in content.array_records:
            raise MessageError(f"{what}: the message has no {ARRAYS!r} record")
        return cls(server_round=int(round_ or 0), run_key=check_run_key(key), proximal_mu=mu,
                   kind=kind, moment_centre=centre, moment_clip=clip, calibration=calibration)


def _finite_list(values: Any, what: str, key: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values):
        raise _fail(what, key, "must be a list of finite numbers")
    return tuple(float(v) for v in values)


# ---------------------------------------------------------------------- replies


def _site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


def _site_label(content: RecordDict, what: str) -> str:
    site = content.config_records.get(SITE)
    if site is None or set(site) != {"name"}:
        raise MessageError(f"{what}: the {SITE!r} record must hold exactly 'name'")
    name = site["name"]
    if not isinstance(name, str) or not SITE_NAME_PATTERN.fullmatch(name):
        raise _fail(what, "site name", "must be 1 to 64 letters, digits, '.', '_' or '-'")
    return name


def _records(content: RecordDict, what: str, arrays: set[str], configs: set[str],
             metrics: set[str]) -> None:
    for kind, have, want in (("array", set(content.array_records), arrays),
                             ("config", set(content.config_records), configs),
                             ("metric", set(content.metric_records), metrics)):
        if have != want:
            raise MessageError(f"{what}: {kind} records {sorted(have)}, expected {sorted(want)}")


def _extras(metrics: Mapping[str, Any], fixed: set[str], what: str) -> dict[str, float]:
    _no_unknown(metrics, fixed | ALL_EXTRA_KEYS, what, ALL_EXTRA_PREFIXES)
    extras = {}
    for key in metrics:
        if key not in fixed:
            extras[key] = float(_number(metrics, key, what) or 0.0)
    return extras


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train message.

    ``weight`` is its aggregation weight: 1 (equal weights), or a DP-noised
    count of its training records (charged). ``extras`` are the named non-DP
    releases its configuration allows (see :data:`NON_DP_RELEASES`).
    """

    arrays: ArrayRecord
    weight: float
    site: str
    extras: dict[str, float] = field(default_factory=dict)

    WEIGHT = "weight"

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays,
                           METRICS: MetricRecord({self.WEIGHT: self.weight, **self.extras}),
                           SITE: _site_record(self.site)})

    @classmethod
    def parse(cls, msg: Message) -> TrainReply:
        what = "train reply"
        content = msg.content
        _records(content, what, {ARRAYS}, {SITE}, {METRICS})
        metrics = content.metric_records[METRICS]
        weight = _number(metrics, cls.WEIGHT, what, low=0, high=MAX_WEIGHT)
        return cls(arrays=content.array_records[ARRAYS], weight=float(weight or 0.0),
                   site=_site_label(content, what),
                   extras=_extras(metrics, {cls.WEIGHT}, what))


@dataclass(frozen=True)
class EvaluateReply:
    """A site's answer to an evaluate message: DP-noised confusion counts.

    ``confusion[i][j]`` counts the site's test records of true class ``i`` the
    model predicts as ``j``, plus Gaussian noise of standard deviation
    ``noise_std`` (charged). ``extras``: exact metrics, where the site's
    configuration allows ``evaluation-metrics``.
    """

    confusion: np.ndarray
    noise_std: float
    site: str
    extras: dict[str, float] = field(default_factory=dict)

    CONFUSION = "confusion"
    NOISE = "confusion-noise-std"

    def to_content(self) -> RecordDict:
        return RecordDict({
            METRICS: MetricRecord({self.CONFUSION: [float(v) for v in self.confusion.ravel()],
                                   self.NOISE: self.noise_std, **self.extras}),
            SITE: _site_record(self.site)})

    @classmethod
    def parse(cls, msg: Message, num_classes: int) -> EvaluateReply:
        what = "evaluate reply"
        content = msg.content
        _records(content, what, set(), {SITE}, {METRICS})
        metrics = content.metric_records[METRICS]
        values = metrics.get(cls.CONFUSION)
        if not isinstance(values, list) or len(values) != num_classes ** 2 or not all(
                isinstance(v, int | float) and math.isfinite(v) and abs(v) <= MAX_WEIGHT
                for v in values):
            raise _fail(what, cls.CONFUSION, f"must be {num_classes ** 2} finite numbers")
        noise = _number(metrics, cls.NOISE, what, low=0, high=MAX_WEIGHT)
        return cls(confusion=np.asarray(values, dtype=np.float64).reshape(num_classes, -1),
                   noise_std=float(noise or 0.0), site=_site_label(content, what),
                   extras=_extras(metrics, {cls.CONFUSION, cls.NOISE}, what))


def _array(record: ArrayRecord, key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    if key not in record:
        raise _fail(what, key, "is missing")
    try:
        value = np.asarray(record[key].numpy(), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _fail(what, key, f"is not a numeric array ({exc})") from None
    if value.shape != shape or not np.all(np.isfinite(value)) or np.any(
            np.abs(value) > MAX_WEIGHT):
        raise _fail(what, key, f"must be a finite array of shape {shape}, got {value.shape}")
    return value


@dataclass(frozen=True)
class MomentsReply:
    """DP per-class sums of normalisation-input moments and DP class counts (charged)."""

    sums: np.ndarray
    counts: np.ndarray
    sum_noise_std: float
    count_noise_std: float
    site: str

    def to_content(self) -> RecordDict:
        return RecordDict({
            SUMMARIES: ArrayRecord({"sums": Array(np.ascontiguousarray(self.sums)),
                                    "counts": Array(np.ascontiguousarray(self.counts))}),
            METRICS: MetricRecord({"sum-noise-std": self.sum_noise_std,
                                   "count-noise-std": self.count_noise_std}),
            SITE: _site_record(self.site)})

    @classmethod
    def parse(cls, msg: Message, sums_shape: tuple[int, int, int]) -> MomentsReply:
        what = "moments reply"
        content = msg.content
        _records(content, what, {SUMMARIES}, {SITE}, {METRICS})
        arrays, metrics = content.array_records[SUMMARIES], content.metric_records[METRICS]
        _no_unknown(arrays, {"sums", "counts"}, what)
        _no_unknown(metrics, {"sum-noise-std", "count-noise-std"}, what)
        return cls(
            sums=_array(arrays, "sums", sums_shape, what),
            counts=_array(arrays, "counts", (sums_shape[0],), what),
            sum_noise_std=float(_number(metrics, "sum-noise-std", what, low=0, high=1e6) or 0),
            count_noise_std=float(_number(metrics, "count-noise-std", what, low=0, high=1e6)
                                  or 0),
            site=_site_label(content, what))


@dataclass(frozen=True)
class ValidationReply:
    """A site's DP score histogram of its labelled validation split (charged)."""

    val_hist: np.ndarray
    val_noise_std: float
    site: str

    def to_content(self) -> RecordDict:
        return RecordDict({
            SUMMARIES: ArrayRecord({"val-hist": Array(np.ascontiguousarray(self.val_hist))}),
            METRICS: MetricRecord({"val-noise-std": self.val_noise_std}),
            SITE: _site_record(self.site)})

    @classmethod
    def parse(cls, msg: Message, hist_shape: tuple[int, int]) -> ValidationReply:
        what = "validation reply"
        content = msg.content
        _records(content, what, {SUMMARIES}, {SITE}, {METRICS})
        arrays, metrics = content.array_records[SUMMARIES], content.metric_records[METRICS]
        _no_unknown(arrays, {"val-hist"}, what)
        _no_unknown(metrics, {"val-noise-std"}, what)
        return cls(
            val_hist=_array(arrays, "val-hist", hist_shape, what),
            val_noise_std=float(_number(metrics, "val-noise-std", what, low=0, high=1e6) or 0),
            site=_site_label(content, what))


@dataclass(frozen=True)
class DeploymentReply:
    """Each label-shift estimator's DP release about the site's deployment pool (charged).

    ``releases`` maps an estimator's name to its noisy statistic and ``noise_stds``
    to the std of the noise on each of its entries (a site without a pool sends
    none); ``extras`` the audit metrics its configuration allows (``audit-metrics``).
    """

    site: str
    releases: dict[str, np.ndarray] = field(default_factory=dict)
    noise_stds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)

    RELEASE = "release."
    NOISE = "noise-std."

    def to_content(self) -> RecordDict:
        arrays = {f"{self.RELEASE}{n}": Array(np.ascontiguousarray(v))
                  for n, v in self.releases.items()}
        metrics: dict[str, Any] = {f"{self.NOISE}{n}": s for n, s in self.noise_stds.items()}
        return RecordDict({SUMMARIES: ArrayRecord(arrays),
                           METRICS: MetricRecord({**metrics, **self.extras}),
                           SITE: _site_record(self.site)})

    @classmethod
    def parse(cls, msg: Message, shapes: Mapping[str, tuple[int, ...]]) -> DeploymentReply:
        """The reply, whose releases must be some of ``shapes`` (estimator name: shape)."""
        what = "deployment reply"
        content = msg.content
        _records(content, what, {SUMMARIES}, {SITE}, {METRICS})
        arrays, metrics = content.array_records[SUMMARIES], content.metric_records[METRICS]
        _no_unknown(arrays, {f"{cls.RELEASE}{n}" for n in shapes}, what)
        names = [n for n in shapes if f"{cls.RELEASE}{n}" in arrays]
        noise_keys = {f"{cls.NOISE}{n}" for n in names}
        return cls(
            site=_site_label(content, what),
            releases={n: _array(arrays, f"{cls.RELEASE}{n}", shapes[n], what) for n in names},
            noise_stds={n: float(_number(metrics, f"{cls.NOISE}{n}", what, low=1e-12,
                                         high=1e6) or 0) for n in names},
            extras=_extras(metrics, noise_keys, what))
