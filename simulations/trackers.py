"""A finished run's metrics in the experiment trackers people already use: TensorBoard.

The tracker is a sink for a run's results (the dict ``results.json`` holds), so it
needs nothing from Flower: :func:`run_scalars` turns the results into scalar
series, one per metric and site (tag ``<metric>/<site>``, or
``<metric>/federation`` and ``<metric>/pooled`` for the whole federation), and
:func:`write_tensorboard` writes them as TensorBoard event files with
``torch.utils.tensorboard``. The series:

- per round (step = round): each site's update norm and aggregation weight, its
  DP-evaluated balanced accuracy and accuracy, every number it released by name
  (``train-loss``, ``compute-seconds``, ...), the federation's DP evaluation, the
  server's wait per phase, the bytes the sites sent, and each site's covariate
  shift score and threshold;
- after the last round (step = last round): each site's test metrics at its
  operating point and the pooled test, its epsilon spent in all and by kind of
  release, and its concept-shift gap.

TensorBoard is optional (``pip install 'fedshift[trackers]'``); :func:`require_tensorboard`
says how to install it before a run starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.federation_config import ConfigError

logger = logging.getLogger(__name__)

TEST_METRICS = ("auroc", "sensitivity", "specificity", "balanced_accuracy", "accuracy", "loss")
DP_EVALUATION = frozenset({"accuracy", "balanced_accuracy"})
"""Evaluation figures the server derives from the sites' DP confusion counts."""
SKIPPED = frozenset({"node", "weight", "confusion", "noise_std", "sites", "update_norm",
                     "aggregation_weight"})
"""Round-entry keys that are not a site's own per-round numbers (or are logged by name)."""


@dataclass(frozen=True)
class Scalar:
    """One point of a series: ``tag`` names the metric and the site, ``step`` the round."""

    tag: str
    step: int
    value: float


def require_tensorboard() -> None:
    """Raise ConfigError, saying how to install it, unless TensorBoard can be imported."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'fedshift[trackers]' (or pip install tensorboard), or leave "
            "--tensorboard out"
        )


def _metric(text: str) -> str:
    """A metric's tag component: lower case, runs of anything but letters and digits as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _site(name: str) -> str:
    """A site's tag component: its name, with ``/`` and white space as ``_``."""
    return re.sub(r"[/\s]+", "_", name)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _numbers(phase: str, values: Any, who: str, step: int) -> Iterator[Scalar]:
    """A scalar per numeric entry of ``values`` (a phase's figures), tagged
    ``dp_<key>/who`` for the metrics of the DP confusion counts, else ``<phase>_<key>/who``
    (``train-loss`` stays ``train_loss``)."""
    if not isinstance(values, Mapping):
        return
    for key, value in values.items():
        number = _number(value)
        if key in SKIPPED or number is None:
            continue
        metric = _metric(key)
        if key in DP_EVALUATION:
            metric = f"dp_{metric}"
        elif not metric.startswith(phase):
            metric = f"{phase}_{metric}"
        yield Scalar(f"{metric}/{who}", step, number)


def _round_scalars(entry: dict[str, Any], step: int, sent: float | None) -> Iterator[Scalar]:
    for site, figures in entry["sites"].items():
        if not isinstance(figures, Mapping):
            continue
        who = _site(site)
        for key in ("update_norm", "aggregation_weight"):
            number = _number(figures.get(key))
            if number is not None:
                yield Scalar(f"{key}/{who}", step, number)
        yield from _numbers("train", figures.get("train"), who, step)
        yield from _numbers("evaluate", figures.get("evaluate"), who, step)
    yield from _numbers("train", entry.get("train"), "federation", step)
    yield from _numbers("evaluate", entry.get("evaluate"), "federation", step)
    yield from _numbers("seconds", entry.get("seconds"), "server", step)
    updates = sum(1 for f in entry["sites"].values() if isinstance(f, Mapping) and "train" in f)
    if sent is not None:
        yield Scalar("bytes_to_server/federation", step, sent * updates)


def run_scalars(results: dict[str, Any]) -> list[Scalar]:
    """Every scalar series of a run's results (see the module docstring), in step order."""
    rounds = results.get("rounds") or []
    sent = _number(results.get("bytes_per_round_per_site"))
    scalars: list[Scalar] = []
    for i, entry in enumerate(rounds):
        scalars += _round_scalars(entry, int(entry.get("round", i + 1)), sent)
    shift = results.get("shift") or {}
    for i, entry in enumerate(shift.get("rounds") or []):
        step = int(entry.get("round", i + 1))
        for site, figures in entry["sites"].items():
            for key in ("covariate_score", "covariate_threshold"):
                number = _number(figures.get(key))
                if number is not None:
                    scalars.append(Scalar(f"{key}/{_site(site)}", step, number))
    last = max((s.step for s in scalars), default=0) or int(
        (results.get("config") or {}).get("num-rounds") or 0)
    for row in results.get("sites") or []:
        who = _site(row["name"])
        test = row.get("test") if isinstance(row.get("test"), Mapping) else {}
        scalars += [Scalar(f"test_{k}/{who}", last, v) for k in TEST_METRICS
                    if (v := _number(test.get(k))) is not None]
        spent = _number(row.get("epsilon_spent"))
        if spent is not None:
            scalars.append(Scalar(f"epsilon/{who}", last, spent))
        for release in row.get("epsilon_by_release") or []:
            value = _number(release.get("epsilon"))
            if value is not None:
                kind = _metric(f"{release.get('mechanism')}_{release.get('part')}")
                scalars.append(Scalar(f"epsilon_{kind}/{who}", last, value))
    pooled = results.get("pooled_test")
    if isinstance(pooled, Mapping):
        scalars += [Scalar(f"test_{k}/pooled", last, v) for k in TEST_METRICS
                    if (v := _number(pooled.get(k))) is not None]
    final = (shift.get("final") or {}).get("sites") or {}
    for site, figures in final.items():
        gap = _number(figures.get("concept_gap")) if isinstance(figures, Mapping) else None
        if gap is not None:
            scalars.append(Scalar(f"concept_gap/{_site(site)}", last, gap))
    return sorted(scalars, key=lambda s: s.step)


def _settings_text(config: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in config.items())
    return f"| setting | value |\n| --- | --- |\n{rows}"


def write_tensorboard(results: dict[str, Any], log_dir: Path) -> int:
    """Write the run's scalar series (and its settings, as text) to TensorBoard event
    files under ``log_dir``; return how many scalars were written.

    Raises
    ------
    ConfigError
        TensorBoard is not installed.
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    scalars = run_scalars(results)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for scalar in scalars:
            writer.add_scalar(scalar.tag, scalar.value, scalar.step)
        if results.get("config"):
            writer.add_text("settings", _settings_text(results["config"]))
    finally:
        writer.close()
    logger.info("wrote %d scalars to TensorBoard event files under %s", len(scalars), log_dir)
    return len(scalars)
