"""A run's report, ``report.md`` and a self-contained ``report.html`` (``fedshift report DIR``).

It reads a run's ``results.json`` and leads with what a person asks first: each
site's test performance at its own operating point and the pooled test, the
learning curve over rounds, each site's privacy spent with its breakdown by
release, and the bytes sent. The shift estimates follow when the run holds any
number to show.

:func:`run_sections` builds what every run's results hold; a caller may add
sections of its own before the run's settings (``extra_sections`` of
:func:`write_report`): a simulation adds how the estimates compare with the
shifts it injected, which only it knows. :mod:`server.report_document` renders
the whole as Markdown (plots as PNG files under ``plots/``) and as one HTML page
with the plots embedded. Any number may be missing (null): a table shows it as
an en dash, drops a column that has none, and a section with nothing to show is
left out.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from server.report_document import (
    Block,
    Bullets,
    Heading,
    Paragraph,
    Plot,
    ReportFiles,
    Table,
    write_report_files,
)
from server.report_plots import Panel, Series, render

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
HTML_FILE = "report.html"
PLOTS_DIR = "plots"
TITLE = "fedshift run report"
MISSING = "\N{EN DASH}"
PLOT_KEYS = ("learning_curve", "privacy", "covariate_scores", "priors", "correction")
"""Every plot :func:`run_sections` may make (file ``plots/<key>.png``, HTML id ``<key>``)."""
TEST_COLUMNS = (("auroc", "AUROC"), ("sensitivity", "sensitivity"),
                ("specificity", "specificity"), ("balanced_accuracy", "balanced accuracy"),
                ("accuracy", "accuracy"))
CORRECTION_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                      ("auroc", "AUROC"), ("nll", "NLL"), ("ece", "ECE"))
VARIANTS = ("uncorrected", "corrected")
SETTINGS = ("dataset", "image-size", "backbone", "mode", "aggregator", "num-rounds",
            "local-epochs", "batch-size", "optimizer", "lr", "clip", "epsilon", "delta",
            "evaluations", "seed")
TOP_LAYERS = 3


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read a run's ``results.json``.

    Parameters
    ----------
    run_dir : Path
        The directory ``fedshift simulate --out`` wrote.

    Returns
    -------
    dict
        The parsed results, checked to have the shape the report reads.

    Raises
    ------
    FileNotFoundError
        ``run_dir/results.json`` does not exist.
    ValueError
        The file is not JSON, or not shaped as a run's results.
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
        check_shape(results)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return results


def write_report(results: dict[str, Any], out_dir: Path,
                 extra_sections: Sequence[Block] = (),
                 extra_plots: Sequence[str] = ()) -> ReportFiles:
    """Write ``out_dir/report.md`` with its plots under ``out_dir/plots/``, and
    ``out_dir/report.html`` with the same content and the plots embedded.

    Parameters
    ----------
    results : dict
        A run's results, as :func:`load_run` returns them.
    out_dir : Path
        Directory to write into; created if absent. An earlier report there is
        replaced, plots it had that this one has not included.
    extra_sections : sequence of Block (default: none)
        Sections a caller adds after :func:`run_sections`, before the settings.
    extra_plots : sequence of str (default: none)
        The keys of every plot ``extra_sections`` may hold, drawn this time or not
        (an earlier report's plot this one lacks is removed).

    Returns
    -------
    ReportFiles
        The paths written.

    Raises
    ------
    ValueError
        ``results`` is not shaped as a run's results.
    """
    check_shape(results)
    out_dir = Path(out_dir)
    blocks = [*run_sections(results), *extra_sections,
              *settings_section(results.get("config") or {})]
    plots_dir = out_dir / PLOTS_DIR
    written = {b.key for b in blocks if isinstance(b, Plot)}
    # a plot this run has no data for must not survive from an earlier one
    for key in (*PLOT_KEYS, *extra_plots):
        if key not in written:
            (plots_dir / f"{key}.png").unlink(missing_ok=True)
    files = write_report_files(TITLE, blocks, out_dir / REPORT_FILE, out_dir / HTML_FILE,
                               plots_dir)
    logger.info("wrote %s and %s", files.markdown, files.html)
    return files


# --- shape of the input ------------------------------------------------------------


def check_shape(results: Any) -> None:
    """Raise ValueError, saying what is wrong, unless ``results`` is shaped as a run's."""
    if not isinstance(results, dict):
        raise ValueError(f"expected a JSON object at the top, got {type(results).__name__}")
    if not any(key in results for key in ("sites", "rounds", "shift")):
        raise ValueError("nothing to report: no 'sites', 'rounds' or 'shift' section")
    for key in ("config", "pooled_test"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            raise ValueError(f"'{key}' is not an object")
    sites = results.get("sites")
    if sites is not None:
        if not isinstance(sites, list):
            raise ValueError("'sites' is not a list")
        for i, site in enumerate(sites):
            if not isinstance(site, dict) or not isinstance(site.get("name"), str):
                raise ValueError(f"'sites[{i}]' is not an object with a 'name'")
    _check_rounds(results.get("rounds"), "rounds")
    shift = results.get("shift")
    if shift is None:
        return
    if not isinstance(shift, dict):
        raise ValueError("'shift' is not an object")
    _check_rounds(shift.get("rounds"), "shift.rounds")
    final = shift.get("final")
    if not isinstance(final, dict) or not isinstance(final.get("sites"), dict):
        raise ValueError("'shift.final' has no 'sites' object")
    for name, site in final["sites"].items():
        if not isinstance(site, dict):
            raise ValueError(f"'shift.final.sites.{name}' is not an object")


def _check_rounds(rounds: Any, where: str) -> None:
    if rounds is None:
        return
    if not isinstance(rounds, list):
        raise ValueError(f"'{where}' is not a list")
    for i, entry in enumerate(rounds):
        if not isinstance(entry, dict) or not isinstance(entry.get("sites"), dict):
            raise ValueError(f"'{where}[{i}]' has no 'sites' object")


def site_names(results: dict[str, Any]) -> list[str]:
    """Every site the run names, in the order of ``sites``, then as first met."""
    names = [s["name"] for s in results.get("sites") or []]
    shift = results.get("shift") or {}
    tables = [entry["sites"] for entry in results.get("rounds") or []]
    tables += [entry["sites"] for entry in shift.get("rounds") or []]
    if shift.get("final") is not None:
        tables.append(shift["final"]["sites"])
    for table in tables:
        names += [n for n in table if n not in names]
    return names


# --- values and formatting -------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _vector(value: Any) -> list[float] | None:
    """A list of finite numbers, or None for anything else."""
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return [float(v) for v in value]
    return None


def _get(table: Any, *keys: str) -> Any:
    """``table[k1][k2]...``, or None where any level is missing or not an object."""
    for key in keys:
        if not isinstance(table, dict):
            return None
        table = table.get(key)
    return table


def _num(value: Any, digits: int = 3, signed: bool = False) -> str:
    if not _is_number(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _significant(value: Any) -> str:
    """Three significant digits, for scores far below 1."""
    return f"{value:.3g}" if _is_number(value) else MISSING


def _percent(value: Any, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f} %" if _is_number(value) else MISSING


def _flag(value: Any) -> str:
    if not isinstance(value, bool):
        return MISSING
    return "yes" if value else "no"


def _bytes(value: Any) -> str:
    if not _is_number(value):
        return MISSING
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def _prior(value: Any, binary: bool) -> str:
    vector = _vector(value)
    if vector is None:
        return MISSING
    if binary:
        return _percent(vector[1])
    return "[" + ", ".join(f"{v:.2f}" for v in vector) + "]"


def _prior_interval(estimate: dict[str, Any], key: str, binary: bool) -> str:
    """A prior estimate with its 90 % interval where it has one: ``62% (55%-70%)``."""
    shown = _prior(estimate.get(key), binary)
    interval = estimate.get(f"{key}_interval")
    if not isinstance(interval, list) or len(interval) != 2:
        return shown
    low, high = (_prior(bound, binary) for bound in interval)
    return shown if MISSING in (low, high) else f"{shown} ({low}-{high})"


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
        cells.append(f"{short} ({_significant(score)})" if _is_number(score) else short)
    return ", ".join(cells)


def _table(key: str, header: Sequence[str], rows: Iterable[Sequence[str]],
           caption: str = "") -> Table:
    """A table without the columns (after the first) that hold no value in any row."""
    rows = [tuple(r) for r in rows]
    keep = [i for i in range(len(header))
            if i == 0 or any(r[i] not in (MISSING, "") for r in rows)]
    return Table(key, tuple(header[i] for i in keep),
                 tuple(tuple(r[i] for i in keep) for r in rows), caption)


def _plot(key: str, caption: str, panels: Sequence[Panel]) -> list[Block]:
    png = render(panels)
    return [] if png is None else [Plot(key, caption, png)]


def _is_binary(results: dict[str, Any]) -> bool:
    """Whether the run's task has two classes (config, else every prior vector)."""
    classes = _get(results, "config", "num-classes")
    if _is_number(classes):
        return classes == 2
    shift = results.get("shift") or {}
    keys = ("training_prior", "deployment_prior", "deployment_prior_bbse")
    table = _get(shift, "final", "sites") or {}
    vectors = [_get(shift, "final", "federation_prior")]
    vectors += [site.get(k) for site in table.values() if isinstance(site, dict) for k in keys]
    return all(len(v) == 2 for v in map(_vector, vectors) if v is not None)


# --- what every run holds ------------------------------------------------------------


def run_sections(results: dict[str, Any]) -> list[Block]:
    """The report's sections from what every run's results hold.

    In this order: a summary, test performance per site and pooled, the learning
    curve, privacy spent, communication, refusals (if any) and the shift estimates
    (if any number). The run's settings (:func:`settings_section`) close the report.
    """
    names = site_names(results)
    blocks = _summary(results, names)
    blocks += _performance_section(results)
    blocks += _own_model_section(results)
    blocks += _learning_section(results, names)
    blocks += _privacy_section(results)
    blocks += _communication_section(results)
    blocks += _incidents_section(results)
    shift = results.get("shift")
    if shift is not None:
        blocks += shift_sections(shift, names, _is_binary(results))
    return blocks


def _summary(results: dict[str, Any], names: list[str]) -> list[Block]:
    config = results.get("config") or {}
    rounds = results.get("rounds") or []
    parts = [f"{len(names)} sites"]
    n_rounds = len(rounds) or config.get("num-rounds")
    if n_rounds:
        parts.append(f"{n_rounds} rounds")
    if config.get("dp") is False:
        parts.append("no differential privacy")
    elif _is_number(config.get("epsilon")):
        delta = f" (δ = {config['delta']:g})" if _is_number(config.get("delta")) else ""
        parts.append(f"ε = {config['epsilon']:g} per site{delta}")
    model = " ".join(str(config[k]) for k in ("backbone", "mode") if config.get(k))
    if model:
        parts.append(model)
    if config.get("dataset"):
        size = config.get("image-size")
        parts.append(f"{config['dataset']}" + (f" at {size} px" if size else ""))
    items = []
    pooled = results.get("pooled_test")
    if isinstance(pooled, dict):
        n = sum(s["test_size"] for s in results.get("sites") or []
                if _is_number(s.get("test_size")))
        scores = ", ".join(f"{label} {_num(pooled[k])}" for k, label in TEST_COLUMNS
                           if _is_number(pooled.get(k)))
        if scores:
            items.append(f"Pooled test{f' ({n} images)' if n else ''}: {scores}.")
    spent = [s["epsilon_spent"] for s in results.get("sites") or []
             if _is_number(s.get("epsilon_spent"))]
    if spent:
        budget = config.get("epsilon")
        of = f" of a budget of {budget:g}" if _is_number(budget) else ""
        spread = (f"each site spent ε {max(spent):.3f}" if max(spent) - min(spent) < 5e-4
                  else f"the sites spent ε {min(spent):.3f} to {max(spent):.3f}")
        items.append(f"Privacy: {spread}{of}.")
    sent = results.get("bytes_per_round_per_site")
    if _is_number(sent):
        fraction = results.get("bytes_fraction_of_full_model")
        share = f" ({_percent(fraction, 2)} of the full model)" if _is_number(fraction) else ""
        items.append(f"Each site sends {_bytes(sent)} per round{share}.")
    blocks: list[Block] = [Paragraph("Run: " + ", ".join(parts) + ".")]
    if items:
        blocks.append(Bullets(tuple(items)))
    return blocks


def _operating_point(point: Any) -> str:
    if not isinstance(point, dict):
        return MISSING
    rule = str(point.get("rule") or MISSING)
    threshold = point.get("threshold")
    return f"p ≥ {threshold:.3f} ({rule})" if _is_number(threshold) else rule


def _performance_section(results: dict[str, Any]) -> list[Block]:
    sites = results.get("sites") or []
    pooled = results.get("pooled_test")
    if not sites and not isinstance(pooled, dict):
        return []
    header = ["site", "prevalence", "train images", "test images",
              *(label for _, label in TEST_COLUMNS), "operating point", "ε spent"]
    rows = []
    for site in sites:
        test = site.get("test") if isinstance(site.get("test"), dict) else {}
        rows.append([site["name"], _num(site.get("prevalence"), 2),
                     str(site["train_size"]) if _is_number(site.get("train_size")) else MISSING,
                     str(site["test_size"]) if _is_number(site.get("test_size")) else MISSING,
                     *(_num(test.get(k)) for k, _ in TEST_COLUMNS),
                     _operating_point(site.get("operating_point")),
                     _num(site.get("epsilon_spent"))])
    if isinstance(pooled, dict):
        n = sum(s["test_size"] for s in sites if _is_number(s.get("test_size")))
        rows.append(["pooled test", "", "", str(n) if n else MISSING,
                     *(_num(pooled.get(k)) for k, _ in TEST_COLUMNS), "each site's own", ""])
    return [
        Heading("Test performance"),
        Paragraph("The final model scored on each site's held-out test split, with the site's "
                  "decisions at its own operating point (calibrated on its validation split; "
                  "p is the calibrated probability of the positive class above which it calls "
                  "an image positive). Pooled: every site's test images, each decided as its "
                  "site decides."),
        _table("test-performance", header, rows),
    ]


def _mix(weight: Any) -> str:
    if not _is_number(weight):
        return MISSING
    return ("federated" if weight == 1 else "own model" if weight == 0
            else f"{weight:.0%} federated")


def _own_model_section(results: dict[str, Any]) -> list[Block]:
    rows = []
    for site in results.get("sites") or []:
        own = site.get("own_model")
        if not isinstance(own, dict):
            continue
        test = site.get("test") if isinstance(site.get("test"), dict) else {}
        alone = own.get("test_alone") if isinstance(own.get("test_alone"), dict) else {}
        mix = own.get("test_mix") if isinstance(own.get("test_mix"), dict) else {}
        rows.append([site["name"], _num(own.get("federated_loss")), _num(own.get("local_loss")),
                     "yes" if own.get("alone_is_better") else "no", _mix(own.get("weight")),
                     "yes" if own.get("decides_with_mix") else "no",
                     _num(test.get("auroc")), _num(alone.get("auroc")), _num(mix.get("auroc")),
                     _num(mix.get("balanced_accuracy"))])
    if not rows:
        return []
    blocks: list[Block] = [
        Heading("Better off alone?"),
        Paragraph("Each site trained a model of its own on its training split, without DP (it "
                  "never leaves the site), and compared it with the federated model on its "
                  "validation split (calibrated log loss), with mixes of the two; a mix "
                  "counts only where it is clearly better there. Test AUROC of the federated "
                  "model, the site's own model and the mix best on validation; a site "
                  "decides with that mix only where its policy says so."),
        _table("own-model", ["site", "federated val. loss", "own val. loss",
                             "alone clearly better", "best mix", "decides with it",
                             "AUROC federated", "AUROC own", "AUROC mix",
                             "balanced accuracy mix"], rows),
    ]
    pooled = results.get("pooled_test_mix")
    if isinstance(pooled, dict):
        blocks.append(Paragraph(f"Pooled test with every site on its best mix: AUROC "
                                f"{_num(pooled.get('auroc'))}, balanced accuracy "
                                f"{_num(pooled.get('balanced_accuracy'))}."))
    return blocks


def _train_replies(entry: dict[str, Any]) -> int:
    """Train replies the server received in a round (used or dropped by its checks)."""
    used = sum(1 for site in entry["sites"].values() if isinstance(site, dict) and "train" in site)
    dropped = sum(1 for key in entry.get("rejected") or {} if " (" not in key)
    return used + dropped


def _asked_to_train(entry: dict[str, Any]) -> int:
    """Sites sent training work in a round: those that replied, refused or were silent."""
    refused = sum(1 for key in entry.get("refused") or {} if key.endswith("(train)"))
    return _train_replies(entry) + refused + len(_get(entry, "missing", "train") or [])


def _learning_section(results: dict[str, Any], names: list[str]) -> list[Block]:
    rounds = results.get("rounds") or []
    if not rounds:
        return []
    numbers = [entry.get("round", i + 1) for i, entry in enumerate(rounds)]
    evaluated = [n for n, entry in zip(numbers, rounds, strict=True)
                 if _is_number(_get(entry, "evaluate", "balanced_accuracy"))]
    losses = any(_is_number(_get(site, "train", "train-loss"))
                 for entry in rounds for site in entry["sites"].values())
    rows = []
    for n, entry in zip(numbers, rounds, strict=True):
        norms = [site["update_norm"] for site in entry["sites"].values()
                 if isinstance(site, dict) and _is_number(site.get("update_norm"))]
        used = sum(1 for site in entry["sites"].values()
                   if isinstance(site, dict) and _is_number(site.get("aggregation_weight")))
        rows.append([str(n), f"{used} of {_asked_to_train(entry)}",
                     _num(sum(norms) / len(norms)) if norms else MISSING,
                     _num(_get(entry, "train", "train-loss")),
                     _num(_get(entry, "evaluate", "balanced_accuracy")),
                     _num(_get(entry, "evaluate", "accuracy")),
                     _num(_get(entry, "seconds", "train"), 1),
                     _num(_get(entry, "seconds", "evaluate"), 1)])
    header = ["round", "updates used", "mean update norm", "train loss",
              "balanced accuracy (DP)", "accuracy (DP)", "training time (s)",
              "evaluation time (s)"]
    panels = []
    if evaluated:
        series = [Series("federation", [_get(e, "evaluate", "balanced_accuracy") for e in rounds],
                         colour=7)]
        series += [Series(name, [_get(e, "sites", name, "evaluate", "balanced_accuracy")
                                 for e in rounds], colour=i) for i, name in enumerate(names)]
        panels.append(Panel("lines", numbers, series, "Balanced accuracy (DP evaluation)",
                            "balanced accuracy", "round", ylim=(0.0, 1.0)))
    if losses:
        panels.append(Panel("lines", numbers, [
            Series(name, [_get(e, "sites", name, "train", "train-loss") for e in rounds],
                   colour=i) for i, name in enumerate(names)],
            "Training loss (released by the sites)", "loss", "round"))
    panels.append(Panel("lines", numbers, [
        Series(name, [_get(e, "sites", name, "update_norm") for e in rounds], colour=i)
        for i, name in enumerate(names)], "Size of each site's update", "L2 norm", "round"))
    where = (f"The sites evaluated the global model under DP in "
             f"round{'s' if len(evaluated) > 1 else ''} "
             f"{', '.join(map(str, evaluated))} (noisy confusion counts on their test splits; "
             f"the --evaluations option sets how many of the last rounds do)." if evaluated else
             "No round had a federated evaluation (--evaluations 0).")
    return [
        Heading("Learning curve"),
        Paragraph(f"Per round: the site updates the server aggregated, how far they moved the "
                  f"parameters, and the federation's DP evaluation. {where}"),
        _table("rounds", header, rows),
        *_plot("learning_curve", "Learning curve per round", panels),
    ]


def _release_label(release: dict[str, Any]) -> str:
    count = release.get("count")
    times = f", {count} release{'s' if count != 1 else ''}" if _is_number(count) else ""
    return f"{release.get('mechanism', '?')} on {release.get('part', '?')}{times}"


def _privacy_section(results: dict[str, Any]) -> list[Block]:
    config = results.get("config") or {}
    sites = results.get("sites") or []
    if config.get("dp") is False:
        return [Heading("Privacy"),
                Paragraph("This run had no differential privacy (a non-private reference): "
                          "nothing the sites sent is covered by a privacy guarantee.")]
    if not any(_is_number(s.get("epsilon_spent")) for s in sites):
        return []
    budget = config.get("epsilon")
    rows = [[s["name"], _num(s.get("epsilon_spent")),
             f"{budget:g}" if _is_number(budget) else MISSING,
             s["accountant"].upper() if isinstance(s.get("accountant"), str) else MISSING,
             _num(s.get("epsilon_prv")), _num(s.get("epsilon_rdp")),
             f"{s['delta']:g}" if _is_number(s.get("delta")) else MISSING,
             str(s.get("composition") or MISSING), _num(s.get("noise_multiplier"), 2),
             _num(s.get("sample_rate")),
             str(s["steps"]) if _is_number(s.get("steps")) else MISSING] for s in sites]
    header = ["site", "ε spent", "ε budget", "accountant", "ε (PRV)", "ε (RDP)", "δ",
              "composition", "DP-SGD noise", "sample rate", "DP-SGD steps"]
    blocks: list[Block] = [
        Heading("Privacy spent"),
        Paragraph("Each site's ε for the whole run, at its δ, as its own ledger certifies it "
                  "(the smaller of the PRV and RDP bounds), covering everything it released."),
        _table("privacy", header, rows),
    ]
    labels: list[str] = []
    for site in sites:
        for release in site.get("epsilon_by_release") or []:
            if isinstance(release, dict) and _release_label(release) not in labels:
                labels.append(_release_label(release))
    if labels:
        by_site = [{_release_label(r): r.get("epsilon") for r in s.get("epsilon_by_release") or []
                    if isinstance(r, dict)} for s in sites]
        blocks.append(_table(
            "privacy-by-release", ["site", *labels],
            [[s["name"], *(_num(own.get(label)) for label in labels)]
             for s, own in zip(sites, by_site, strict=True)],
            "ε of each kind of release alone (mechanism, the part of the data it reads, and "
            "how many). Composed they give the site's ε above, which is less than their sum."))
        series = [Series(label, [own.get(label) for own in by_site], colour=j + 1)
                  for j, label in enumerate(labels)]
    else:
        parts = [p for p in ("train", "validation", "deployment", "test")
                 if any(_is_number(_get(s, "epsilon_by_part", p)) for s in sites)]
        if parts:
            blocks.append(_table(
                "privacy-by-part", ["site", *parts],
                [[s["name"], *(_num(_get(s, "epsilon_by_part", p)) for p in parts)]
                 for s in sites], "ε of the releases on each part of a site's data alone."))
        series = [Series(p, [_get(s, "epsilon_by_part", p) for s in sites], colour=j + 1)
                  for j, p in enumerate(parts)]
    series.insert(0, Series("whole run", [s.get("epsilon_spent") for s in sites], colour=0))
    blocks += _plot("privacy", "ε spent per site, in all and by release", [Panel(
        "bars", [s["name"] for s in sites], series, "Privacy spent per site", "ε",
        reference=(budget, "budget") if _is_number(budget) else None)])
    return blocks


def _communication_section(results: dict[str, Any]) -> list[Block]:
    sent = results.get("bytes_per_round_per_site")
    if not _is_number(sent):
        return []
    full = results.get("full_model_bytes")
    params = results.get("trainable_parameters")
    share = results.get("bytes_fraction_of_full_model")
    what = f"{params:,} trainable parameters" if _is_number(params) else "the trainable parameters"
    of_full = (f", {_percent(share, 2)} of the full model's {_bytes(full)}"
               if _is_number(share) and _is_number(full) else "")
    rows = [[str(entry.get("round", i + 1)), str(_asked_to_train(entry)),
             _bytes(sent * _asked_to_train(entry)), str(_train_replies(entry)),
             _bytes(sent * _train_replies(entry))]
            for i, entry in enumerate(results.get("rounds") or [])]
    blocks: list[Block] = [
        Heading("Communication"),
        Paragraph(f"The global model and each site's update carry only {what}: "
                  f"{_bytes(sent)} per site and direction per round{of_full}. Shift summaries "
                  f"and evaluation counts add a few KiB."),
    ]
    if rows:
        blocks.append(_table("bytes", ["round", "sites sent the model", "server → sites",
                                       "updates received", "sites → server"], rows))
    return blocks


def _incidents_section(results: dict[str, Any]) -> list[Block]:
    rows = []
    for i, entry in enumerate(results.get("rounds") or []):
        n = str(entry.get("round", i + 1))
        rows += [[n, who, "refused", str(why)] for who, why in (entry.get("refused") or {}).items()]
        rows += [[n, who, "dropped by the server", str(why)]
                 for who, why in (entry.get("rejected") or {}).items()]
        rows += [[n, f"{who} ({phase})", "no reply in time", ""]
                 for phase, whos in (entry.get("missing") or {}).items() for who in whos]
        if entry.get("kept_global"):
            rows.append([n, "server", "kept the global parameters", str(entry["kept_global"])])
    shift = results.get("shift") or {}
    rows += [["", who, "refused", str(why)] for who, why in (shift.get("refused") or {}).items()]
    if not rows:
        return []
    return [Heading("Refusals and dropped replies"),
            _table("incidents", ["round", "who", "what", "reason"], rows)]


def settings_section(config: dict[str, Any]) -> list[Block]:
    """The run's main settings, as a list."""
    shown = [f"{k}: {config[k]}" for k in SETTINGS if config.get(k) not in (None, "")]
    if not shown:
        return []
    return [Heading("Run settings"), Bullets(tuple(shown))]


# --- shift estimates (every run that queried them) -----------------------------------


def shift_sections(shift: dict[str, Any], names: list[str], binary: bool) -> list[Block]:
    """The server's shift estimates: covariate, label and concept shift, and the
    label-shift correction; each section only when it holds a number."""
    final = shift["final"]
    rounds = shift.get("rounds") or []
    table = final["sites"]
    sites = [n for n in names if n in table or any(n in r["sites"] for r in rounds)]
    blocks = _covariate_section(table, sites, rounds)
    blocks += _label_section(final, sites, binary)
    blocks += _concept_section(table, sites)
    blocks += _correction_section(table, sites)
    return blocks


def _has_any(table: dict[str, Any], sites: list[str], keys: Sequence[str]) -> bool:
    return any(_get(table, s, k) is not None for s in sites for k in keys)


def _covariate_section(table: dict[str, Any], sites: list[str],
                       rounds: list[dict[str, Any]]) -> list[Block]:
    per_round = any(_is_number(_get(r["sites"], s, "covariate_score"))
                    for r in rounds for s in sites)
    if not per_round and not _has_any(table, sites, ("covariate_score",)):
        return []
    rows = [[s, _significant(_get(table, s, "covariate_score")),
             _significant(_get(table, s, "covariate_threshold")),
             _flag(_get(table, s, "covariate_flagged")),
             _layers(_get(table, s, "top_layers"))] for s in sites]
    numbers = [entry.get("round", k + 1) for k, entry in enumerate(rounds)]
    series = []
    for i, site in enumerate(sites):
        series.append(Series(site, [_get(r["sites"], site, "covariate_score") for r in rounds],
                             colour=i))
        series.append(Series(f"_threshold {site}",
                             [_get(r["sites"], site, "covariate_threshold") for r in rounds],
                             "dashed", colour=i))
    return [
        Heading("Covariate shift"),
        _table("covariate-shift", ["site", "score", "threshold", "flagged",
                                   "top shifted layers"], rows,
               "Final covariate score per site against its threshold, and the normalisation "
               f"layers whose input statistics moved most (first {TOP_LAYERS})."),
        *_plot("covariate_scores", "Covariate score over rounds (dashed: threshold)",
               [Panel("lines", numbers, series, "Covariate score per round", "covariate score",
                      "round")]),
    ]


def _label_section(final: dict[str, Any], sites: list[str], binary: bool) -> list[Block]:
    table = final["sites"]
    keys = ("training_prior", "deployment_prior", "deployment_prior_bbse")
    if not any(_vector(_get(table, s, k)) for s in sites for k in keys):
        return []
    unit = "the class-1 fraction" if binary else "class proportions"
    rows = [[s, _prior(_get(table, s, "training_prior"), binary),
             _prior_interval(table.get(s) or {}, "deployment_prior", binary),
             _prior_interval(table.get(s) or {}, "deployment_prior_bbse", binary),
             _weights(_get(table, s, "importance_weights"))] for s in sites]
    blocks: list[Block] = [
        Heading("Label shift"),
        Paragraph(f"Class priors estimated from DP summaries, shown as {unit}; deployment "
                  "priors with their 90 % interval (sampling, calibration and DP noise). "
                  f"Federation prior: {_prior(final.get('federation_prior'), binary)}."),
        _table("label-shift", ["site", "training prior", "deployment prior (MLLS, 90 %)",
                               "deployment prior (BBSE, 90 %)", "importance weights"], rows),
    ]
    if binary:
        def class_one(key: str) -> list[float | None]:
            vectors = [_vector(_get(table, s, key)) for s in sites]
            return [None if v is None else v[1] for v in vectors]

        federation = _vector(final.get("federation_prior"))
        blocks += _plot("priors", "Estimated class-1 prior per site", [Panel(
            "bars", sites, [Series("training", class_one("training_prior")),
                            Series("deployment (MLLS)", class_one("deployment_prior")),
                            Series("deployment (BBSE)", class_one("deployment_prior_bbse"))],
            "Class-1 prior per site", "class-1 fraction", ylim=(0.0, 1.0),
            reference=None if federation is None else (federation[1], "federation prior"))])
    return blocks


def _concept_section(table: dict[str, Any], sites: list[str]) -> list[Block]:
    if not any(_is_number(_get(table, s, "concept_gap")) for s in sites):
        return []
    rows = [[s, _num(_get(table, s, "concept_gap")), _num(_get(table, s, "concept_threshold")),
             _flag(_get(table, s, "concept_flagged"))] for s in sites]
    return [Heading("Concept shift"),
            _table("concept-shift", ["site", "gap", "threshold", "flagged"], rows,
                   "How much worse the labels fit the prior-corrected model than it expects, "
                   "against the federation's median.")]


def _correction_section(table: dict[str, Any], sites: list[str]) -> list[Block]:
    def metrics(site: str, variant: str) -> dict[str, Any]:
        entry = _get(table, site, "metrics", variant)
        return entry if isinstance(entry, dict) else {}

    if not any(_is_number(v) for s in sites for variant in VARIANTS
               for v in metrics(s, variant).values()):
        return []
    rows = []
    for s in sites:
        before, after = metrics(s, "uncorrected"), metrics(s, "corrected")
        change = (after["nll"] - before["nll"]
                  if _is_number(after.get("nll")) and _is_number(before.get("nll")) else None)
        rows.append([s, "uncorrected", *(_num(before.get(k)) for k, _ in CORRECTION_METRICS),
                     ""])
        rows.append([s, "corrected", *(_num(after.get(k)) for k, _ in CORRECTION_METRICS),
                     _num(change, signed=True)])
    panels = [Panel("bars", sites, [Series(variant, [metrics(s, variant).get(key) for s in sites])
                                    for variant in VARIANTS], f"{key.upper()} per site",
                    key.upper()) for key in ("nll", "ece")]
    return [
        Heading("Label-shift correction"),
        _table("correction", ["site", "", *(label for _, label in CORRECTION_METRICS), "ΔNLL"],
               rows, "Metrics on each site's deployment pool without and with the label-shift "
                     "correction; ΔNLL is corrected minus uncorrected (negative: it helped)."),
        *_plot("correction", "NLL and ECE without and with the correction", panels),
    ]
