"""Charts of a run report, drawn with matplotlib and returned as PNG bytes.

The report (:mod:`server.run_report`) decides what to show; this module only draws
it: one or more panels side by side, each either lines over rounds or grouped bars
over sites. A missing value (None, NaN, infinite) is left out: a gap in a line, no
bar. A chart with no value to draw is not drawn (None).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Style = Literal["line", "dashed", "points"]


@dataclass(frozen=True)
class Series:
    """One named sequence of values, aligned with its panel's ``x``.

    ``style``: ``line`` (markers joined by a line), ``dashed`` (a line without
    markers, for thresholds) or ``points`` (markers only). ``colour`` indexes
    matplotlib's colour cycle, so that one site keeps its colour across panels.
    """

    label: str
    values: Sequence[float | None]
    style: Style = "line"
    colour: int | None = None


@dataclass(frozen=True)
class Panel:
    """One set of axes: ``lines`` over numeric ``x`` (rounds) or ``bars`` over labels."""

    kind: Literal["lines", "bars"]
    x: Sequence[float | str]
    series: Sequence[Series]
    title: str
    ylabel: str
    xlabel: str = ""
    ylim: tuple[float, float] | None = None
    reference: tuple[float, str] | None = None
    """A horizontal reference line (value, label)."""


def _finite(value: float | None) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _has_values(panels: Sequence[Panel]) -> bool:
    """Whether any series of ``panels`` holds a value to draw."""
    return any(_finite(v) for p in panels for s in p.series for v in s.values)


def _colour(series: Series, index: int) -> str:
    return f"C{series.colour if series.colour is not None else index}"


def _lines(ax: Axes, panel: Panel) -> None:
    for i, series in enumerate(panel.series):
        points = [(x, v) for x, v in zip(panel.x, series.values, strict=True) if _finite(v)]
        if not points:
            continue
        xs = list(panel.x)
        ys = [v if _finite(v) else math.nan for v in series.values]
        style = {"line": "o-", "dashed": "--", "points": "o"}[series.style]
        ax.plot(xs, ys, style, color=_colour(series, i), label=series.label,
                alpha=0.7 if series.style == "dashed" else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(panel.x) - 0.5, max(panel.x) + 0.5)  # every round, drawn or not


def _bars(ax: Axes, panel: Panel) -> None:
    """Grouped bars: one group per label of ``x``, one bar per series."""
    width = 0.8 / max(len(panel.series), 1)
    for j, series in enumerate(panel.series):
        points = [(i, v) for i, v in enumerate(series.values) if _finite(v)]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], ys, width, label=series.label,
                   color=_colour(series, j))
    ax.set_xticks(range(len(panel.x)), [str(x) for x in panel.x],
                  rotation=30 if len(panel.x) > 6 else 0)
    ax.set_xlim(-0.5, len(panel.x) - 0.5)


def render(panels: Sequence[Panel], height: float = 3.6) -> bytes | None:
    """The panels side by side as one PNG, with one legend for all; None if nothing to draw."""
    if not panels or not _has_values(panels):
        return None
    width = sum(max(5.0, 0.9 * len(p.x) + 2) if p.kind == "bars" else 5.0 for p in panels)
    width += 1.8  # the legend
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        (_lines if panel.kind == "lines" else _bars)(ax, panel)
        if panel.reference is not None:
            value, label = panel.reference
            ax.axhline(value, color="gray", linestyle=":", label=label)
        ax.set(title=panel.title, ylabel=panel.ylabel, xlabel=panel.xlabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(axis="y", alpha=0.3)
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper",
                   fontsize="small", frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
