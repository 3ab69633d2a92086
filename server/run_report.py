"""A Markdown report with PNG plots of a run's shift estimates (``fedshift report DIR``).

The report reads the ``shift`` section of a simulation's ``results.json``: covariate
scores per round, the final covariate, label- and concept-shift estimates per site,
the test metrics with and without label-shift correction and, for simulations with
ground truth, how well the estimates matched it. Any number may be missing (null);
tables show it as an en dash and plots leave it out.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
MISSING = "\N{EN DASH}"
METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("auroc", "AUROC"),
    ("nll", "NLL"),
    ("ece", "ECE"),
)
VARIANTS = ("uncorrected", "corrected")
CONFIG_KEYS = ("dataset", "backbone", "mode", "aggregator", "num-rounds", "epsilon", "delta")
TOP_LAYERS = 3
PLOT_FILES = ("covariate_scores.png", "priors.png", "correction.png")


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read a simulation's ``results.json``.

    Parameters
    ----------
    run_dir : Path
        The directory ``fedshift simulate --out`` wrote.

    Returns
    -------
    dict
        The parsed results, with a ``shift`` section of the expected shape.

    Raises
    ------
    FileNotFoundError
        ``run_dir/results.json`` does not exist.
    ValueError
        The file is not JSON or its ``shift`` section is not shaped as expected.
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `fedshift simulate --out {run_dir}` writes it"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    try:
        _check_shape(results)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return results


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` and its plots under ``out_dir/plots/``.

    Parameters
    ----------
    results : dict
        A run's results, as :func:`load_run` returns them; only ``shift`` is
        required, ``config`` adds a summary of the run's settings.
    out_dir : Path
        Directory to write into; created if absent. An earlier report and its plots
        there are replaced.

    Returns
    -------
    Path
        The report's path.

    Raises
    ------
    ValueError
        ``results`` has no ``shift`` section of the expected shape.
    """
    _check_shape(results)
    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a plot this run has no data for must not survive from an earlier one
        (plots_dir / name).unlink(missing_ok=True)

    shift = results["shift"]
    rounds = shift.get("rounds") or []
    final = shift["final"]
    scoring = shift.get("scoring")
    sites = _site_names(shift)
    binary = _is_binary(shift)

    lines = ["# fedshift shift report", "", _summary(results, sites, rounds), ""]
    lines += _config_lines(results.get("config") or {})
    lines += _covariate_section(final, sites, rounds, plots_dir)
    lines += _label_section(final, scoring, sites, binary, plots_dir)
    lines += _concept_section(final, sites)
    lines += _metrics_section(final, sites, plots_dir)
    if scoring is not None:
        lines += _scoring_section(scoring, sites, binary)

    report = out_dir / REPORT_FILE
    report.write_text("\n".join(lines), encoding="utf-8")
    logger.info("wrote %s", report)
    return report


# --- shape of the input ------------------------------------------------------------


def _check_shape(results: Any) -> None:
    if not isinstance(results, dict):
        raise ValueError(f"expected a JSON object at the top, got {type(results).__name__}")
    config = results.get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError("'config' is not an object")
    shift = results.get("shift")
    if shift is None:
        raise ValueError("no 'shift' section: the run holds no shift estimates")
    if not isinstance(shift, dict):
        raise ValueError("'shift' is not an object")
    rounds = shift.get("rounds")
    if rounds is not None:
        if not isinstance(rounds, list):
            raise ValueError("'shift.rounds' is not a list")
        for i, entry in enumerate(rounds):
            if not isinstance(entry, dict) or not isinstance(entry.get("sites"), dict):
                raise ValueError(f"'shift.rounds[{i}]' has no 'sites' object")
    final = shift.get("final")
    if not isinstance(final, dict) or not isinstance(final.get("sites"), dict):
        raise ValueError("'shift.final' has no 'sites' object")
    for name, site in final["sites"].items():
        if not isinstance(site, dict):
            raise ValueError(f"'shift.final.sites.{name}' is not an object")
    scoring = shift.get("scoring")
    if scoring is not None and (
        not isinstance(scoring, dict) or not isinstance(scoring.get("sites"), dict)
    ):
        raise ValueError("'shift.scoring' has no 'sites' object")


def _site_names(shift: dict[str, Any]) -> list[str]:
    names = list(shift["final"]["sites"])
    sources = [r["sites"] for r in shift.get("rounds") or []]
    if shift.get("scoring") is not None:
        sources.append(shift["scoring"]["sites"])
    for source in sources:
        names += [n for n in source if n not in names]
    return names


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _vector(value: Any) -> list[float] | None:
    """A list of finite numbers, or None for anything else."""
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return [float(v) for v in value]
    return None


def _is_binary(shift: dict[str, Any]) -> bool:
    """Whether every prior vector in the run has two classes."""
    keys = ("training_prior", "deployment_prior", "deployment_prior_bbse",
            "true_training_prior", "true_deployment_prior")
    tables = [shift["final"]["sites"]]
    if shift.get("scoring") is not None:
        tables.append(shift["scoring"]["sites"])
    vectors = [shift["final"].get("federation_prior")]
    vectors += [site.get(k) for table in tables for site in table.values()
                if isinstance(site, dict) for k in keys]
    return all(len(v) == 2 for v in map(_vector, vectors) if v is not None)


def _get(table: dict[str, Any], site: str, key: str) -> Any:
    entry = table.get(site)
    return entry.get(key) if isinstance(entry, dict) else None


# --- formatting ------------------------------------------------------------------


def _num(value: Any, digits: int = 3, signed: bool = False) -> str:
    if not _is_number(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f} %" if _is_number(value) else MISSING


def _flag(value: Any) -> str:
    if not isinstance(value, bool):
        return MISSING
    return "yes" if value else "no"


def _prior(value: Any, binary: bool) -> str:
    vector = _vector(value)
    if vector is None:
        return MISSING
    if binary:
        return _percent(vector[1])
    return "[" + ", ".join(f"{v:.2f}" for v in vector) + "]"


def _weights(value: Any) -> str:
    vector = _vector(value)
    return MISSING if vector is None else ", ".join(f"{v:.2f}" for v in vector)


def _layers(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return MISSING
    cells = []
    for entry in value[:TOP_LAYERS]:
        pair = isinstance(entry, list | tuple) and len(entry) == 2
        name, score = entry if pair else (entry, None)
        short = str(name).removeprefix("backbone.")
        cells.append(f"{short} ({_num(score)})" if _is_number(score) else short)
    return ", ".join(cells)


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def _summary(results: dict[str, Any], sites: list[str], rounds: list[Any]) -> str:
    config = results.get("config") or {}
    n_rounds = len(rounds) or config.get("num-rounds")
    parts = [f"{len(sites)} sites"]
    if n_rounds:
        parts.append(f"{n_rounds} rounds")
    if config.get("dp") is False:
        parts.append("no differential privacy")
    elif _is_number(config.get("epsilon")):
        parts.append(f"ε = {config['epsilon']:g} per site")
    return "Run: " + ", ".join(parts) + "."


def _config_lines(config: dict[str, Any]) -> list[str]:
    shown = [f"- {k}: {config[k]}" for k in CONFIG_KEYS if config.get(k) is not None]
    return ["## Run settings", "", *shown, ""] if shown else []


# --- sections --------------------------------------------------------------------


def _covariate_section(final: dict[str, Any], sites: list[str], rounds: list[dict[str, Any]],
                       plots_dir: Path) -> list[str]:
    table = final["sites"]
    rows = [[s, _num(_get(table, s, "covariate_score")),
             _num(_get(table, s, "covariate_threshold")),
             _flag(_get(table, s, "covariate_flagged")),
             _layers(_get(table, s, "top_layers"))] for s in sites]
    lines = ["## Covariate shift", "",
             "Final covariate score per site against its threshold, and the BatchNorm layers "
             f"whose input statistics moved most (first {TOP_LAYERS}).", ""]
    lines += _table(["site", "score", "threshold", "flagged", "top shifted layers"], rows)
    lines += _plot_lines(_plot_covariate(rounds, sites, plots_dir),
                         "Covariate score over rounds", "no covariate scores per round")
    return lines


def _label_section(final: dict[str, Any], scoring: dict[str, Any] | None, sites: list[str],
                   binary: bool, plots_dir: Path) -> list[str]:
    table = final["sites"]
    unit = "the class-1 fraction" if binary else "class proportions"
    rows = [[s, _prior(_get(table, s, "training_prior"), binary),
             _prior(_get(table, s, "deployment_prior"), binary),
             _prior(_get(table, s, "deployment_prior_bbse"), binary),
             _weights(_get(table, s, "importance_weights"))] for s in sites]
    lines = ["## Label shift", "",
             f"Priors are shown as {unit}. Federation prior: "
             f"{_prior(final.get('federation_prior'), binary)}.", ""]
    lines += _table(["site", "training prior", "deployment prior (MLLS)",
                     "deployment prior (BBSE)", "importance weights"], rows)
    lines += _plot_lines(_plot_priors(final, scoring, sites, binary, plots_dir),
                         "Estimated priors", "no prior estimates to plot")
    return lines


def _concept_section(final: dict[str, Any], sites: list[str]) -> list[str]:
    table = final["sites"]
    rows = [[s, _num(_get(table, s, "concept_gap")), _num(_get(table, s, "concept_threshold")),
             _flag(_get(table, s, "concept_flagged"))] for s in sites]
    return ["## Concept shift", "", *_table(["site", "gap", "threshold", "flagged"], rows)]


def _metrics(final: dict[str, Any], site: str, variant: str) -> dict[str, Any]:
    metrics = _get(final["sites"], site, "metrics")
    entry = metrics.get(variant) if isinstance(metrics, dict) else None
    return entry if isinstance(entry, dict) else {}


def _metrics_section(final: dict[str, Any], sites: list[str], plots_dir: Path) -> list[str]:
    rows = []
    for s in sites:
        before, after = _metrics(final, s, "uncorrected"), _metrics(final, s, "corrected")
        nll_change = (after["nll"] - before["nll"]
                      if _is_number(after.get("nll")) and _is_number(before.get("nll")) else None)
        rows.append([s, "uncorrected", *(_num(before.get(k)) for k, _ in METRICS), ""])
        rows.append([s, "corrected", *(_num(after.get(k)) for k, _ in METRICS),
                     _num(nll_change, signed=True)])
    lines = ["## Label-shift correction", "",
             "Test metrics without and with the label-shift correction; ΔNLL is corrected minus "
             "uncorrected (negative: the correction helped).", ""]
    lines += _table(["site", "", *(label for _, label in METRICS), "ΔNLL"], rows)
    lines += _plot_lines(_plot_correction(final, sites, plots_dir),
                         "NLL and ECE without and with correction", "no metrics to plot")
    return lines


def _scoring_section(scoring: dict[str, Any], sites: list[str], binary: bool) -> list[str]:
    table = scoring["sites"]
    names = [s for s in sites if s in table]
    errors = [[s, _prior(_get(table, s, "true_training_prior"), binary),
               _prior(_get(table, s, "true_deployment_prior"), binary),
               _num(_get(table, s, "training_prior_l1")),
               _num(_get(table, s, "deployment_prior_l1")),
               _num(_get(table, s, "deployment_prior_bbse_l1"))] for s in names]
    flags = [[s, str(_get(table, s, "covariate_kind") or MISSING),
              _num(_get(table, s, "severity"), digits=2), _flag(_get(table, s, "shifted")),
              _flag(_get(table, s, "covariate_flagged")), _flag(_get(table, s, "concept")),
              _flag(_get(table, s, "concept_flagged"))] for s in names]
    lines = ["## Against the ground truth", "",
             f"- Spearman correlation of covariate score with severity: "
             f"{_num(scoring.get('spearman_covariate_severity'))}",
             f"- Covariate detection rate (sites whose flag is right): "
             f"{_percent(scoring.get('detection_rate'))}"]
    if "concept_detection_rate" in scoring:
        lines.append(f"- Concept detection rate: {_percent(scoring['concept_detection_rate'])}")
    unknown = [s for s in sites if s not in table]
    if unknown:
        lines.append(f"- No ground truth for: {', '.join(unknown)}")
    lines += ["", "L1 error of the prior estimates against the true priors.", ""]
    lines += _table(["site", "true training prior", "true deployment prior", "L1 training",
                     "L1 deployment (MLLS)", "L1 deployment (BBSE)"], errors)
    lines += ["Flags against the simulated shifts.", ""]
    lines += _table(["site", "covariate kind", "severity", "shifted", "covariate flagged",
                     "concept shift", "concept flagged"], flags)
    return lines


# --- plots -----------------------------------------------------------------------


def _plot_lines(name: str | None, caption: str, absent: str) -> list[str]:
    if name is None:
        return [f"_({absent})_", ""]
    return [f"![{caption}]({PLOTS_DIR}/{name})", ""]


def _save(fig: Figure, plots_dir: Path, name: str) -> str:
    path = plots_dir / name
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    logger.info("wrote %s", path)
    return name


def _bars(ax: Axes, sites: list[str], series: list[tuple[str, list[Any]]]) -> None:
    """Grouped bars, one group per site, one bar per series; missing values left out."""
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        points = [(i, v) for i, v in enumerate(values) if _is_number(v)]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], ys, width, label=label,
                   color=f"C{j}")
    ax.set_xticks(range(len(sites)), sites, rotation=30 if len(sites) > 6 else 0)
    ax.set_xlim(-0.5, len(sites) - 0.5)


def _plot_covariate(rounds: list[dict[str, Any]], sites: list[str], plots_dir: Path) -> str | None:
    numbers = [entry.get("round", k + 1) for k, entry in enumerate(rounds)]

    def series(site: str, key: str) -> list[float]:
        """One value per round; NaN (a gap in the line) where it is missing."""
        values = [_get(entry["sites"], site, key) for entry in rounds]
        return [v if _is_number(v) else math.nan for v in values]

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    drawn = False
    for i, site in enumerate(sites):
        scores = series(site, "covariate_score")
        if any(map(math.isfinite, scores)):
            ax.plot(numbers, scores, "o-", color=f"C{i}", label=site)
            drawn = True
        thresholds = series(site, "covariate_threshold")
        if any(map(math.isfinite, thresholds)):
            ax.plot(numbers, thresholds, "--", color=f"C{i}", alpha=0.7)
    if not drawn:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="covariate score",
           title="Covariate score per round (dashed: threshold)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, plots_dir, PLOT_FILES[0])


def _plot_priors(final: dict[str, Any], scoring: dict[str, Any] | None, sites: list[str],
                 binary: bool, plots_dir: Path) -> str | None:
    fig = Figure(figsize=(max(6.0, 1.2 * len(sites) + 2), 4))
    ax = fig.add_subplot()
    truth = scoring["sites"] if scoring is not None else {}
    if binary:
        def class_one(table: dict[str, Any], key: str) -> list[Any]:
            vectors = [_vector(_get(table, s, key)) for s in sites]
            return [None if v is None else v[1] for v in vectors]

        series = [("training (estimated)", class_one(final["sites"], "training_prior")),
                  ("deployment MLLS", class_one(final["sites"], "deployment_prior")),
                  ("deployment BBSE", class_one(final["sites"], "deployment_prior_bbse"))]
        if scoring is not None:
            series += [("training (true)", class_one(truth, "true_training_prior")),
                       ("deployment (true)", class_one(truth, "true_deployment_prior"))]
        federation = _vector(final.get("federation_prior"))
        if federation is not None:
            ax.axhline(federation[1], color="gray", linestyle=":", label="federation prior")
        ax.set(ylabel="class-1 fraction", ylim=(0, 1), title="Class-1 prior per site")
    elif scoring is not None:
        series = [(label, [_get(truth, s, key) for s in sites]) for label, key in (
            ("training", "training_prior_l1"), ("deployment MLLS", "deployment_prior_l1"),
            ("deployment BBSE", "deployment_prior_bbse_l1"))]
        ax.set(ylabel="L1 error", title="L1 error of the prior estimates per site")
    else:
        return None
    if not any(_is_number(v) for _, values in series for v in values):
        return None
    _bars(ax, sites, series)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, plots_dir, PLOT_FILES[1])


def _plot_correction(final: dict[str, Any], sites: list[str], plots_dir: Path) -> str | None:
    panels = {key: [(variant, [_metrics(final, s, variant).get(key) for s in sites])
                    for variant in VARIANTS] for key in ("nll", "ece")}
    if not any(_is_number(v) for series in panels.values() for _, vs in series for v in vs):
        return None
    fig = Figure(figsize=(max(8.0, 1.6 * len(sites) + 3), 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, series) in zip(axes, panels.items(), strict=True):
        _bars(ax, sites, series)
        ax.set(ylabel=key.upper(), title=f"{key.upper()} per site")
    fig.legend(handles=[Patch(color=f"C{j}", label=variant) for j, variant in enumerate(VARIANTS)],
               loc="outside upper center", ncol=len(VARIANTS))
    return _save(fig, plots_dir, PLOT_FILES[2])
