"""A study's results as tables (CSV + Markdown), plots and checked claims.

Reads every finished cell's ``results.json`` and writes to the study directory:

- ``summary.csv``: one row per cell (pooled and per-site test metrics, privacy
  spent, bytes per round, wall time); ``sites.csv``: one row per cell and site;
- ``summary.md``: the table averaged over seeds (mean and standard deviation),
  the claims below, and the plots;
- ``epsilon.png`` (pooled AUROC against epsilon per method),
  ``fed_vs_local.png`` (each site's AUROC federated against local-only: points
  below the diagonal are negative transfer) and ``cost.png`` (wall time and bytes
  per round against the number of sites).

Claims, for every grid point (epsilon, sites, label skew, severity) that has the
methods involved, with per-site AUROC averaged over seeds: fedshift is at least
as good as local-only at every site (no negative transfer); fedshift beats
federated head-only and GroupNorm full fine-tuning on pooled AUROC; fedshift
sends at most 2 % of the full model per round.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.run_report import RESULTS_FILE
from simulations.methods import get_method
from simulations.study import CELLS_DIR

METRICS = ("auroc", "balanced_accuracy", "accuracy", "loss")
POINT = ("epsilon", "sites", "label_skew", "severity")
BYTES_BOUND = 0.02
RIVALS = ("head", "gn-full")


@dataclass(frozen=True)
class Claim:
    """One checked statement of the study and the figures behind it."""

    text: str
    holds: bool
    evidence: str


def load_cells(out_dir: Path) -> list[dict[str, Any]]:
    """Every finished cell's results under ``out_dir``, ordered by cell key."""
    paths = sorted((out_dir / CELLS_DIR).glob(f"*/{RESULTS_FILE}"))
    return [json.loads(p.read_text()) for p in paths]


def _mean(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _cell_keys(results: dict[str, Any]) -> dict[str, Any]:
    """The cell's method, grid point and seed (JSON stores epsilon = inf as null)."""
    cell = results["cell"]
    keys = {k: cell[k] for k in ("method", *POINT, "seed")}
    keys["epsilon"] = math.inf if keys["epsilon"] is None else keys["epsilon"]
    return keys


def cell_row(results: dict[str, Any]) -> dict[str, Any]:
    """The summary row of one cell."""
    sites = results["sites"]
    aurocs = [s["test"]["auroc"] for s in sites]
    spent = [s["epsilon_spent"] for s in sites if s["epsilon_spent"] is not None]
    row = _cell_keys(results)
    row.update({f"pooled_{m}": results["pooled_test"][m] for m in METRICS})
    row.update({
        "site_auroc_mean": _mean(aurocs),
        "site_auroc_min": min((a for a in aurocs if a is not None), default=math.nan),
        "epsilon_spent_max": max(spent) if spent else None,
        "bytes_per_round_per_site": results["bytes_per_round_per_site"],
        "bytes_fraction": results["bytes_fraction_of_full_model"],
        "trainable_parameters": results["trainable_parameters"],
        "wall_seconds": results.get("wall_seconds"),
    })
    return row


def site_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per site of one cell."""
    return [{**_cell_keys(results), "site": s["name"],
             "train_size": s["train_size"], "epsilon_spent": s["epsilon_spent"],
             **{m: s["test"][m] for m in METRICS}} for s in results["sites"]]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _eps(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:g}"


def _fmt(values: list[float], digits: int = 3) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    sd = _sd(finite)
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _grouped(rows: list[dict[str, Any]], keys: tuple[str, ...]
             ) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary table, one line per method and grid point, averaged over seeds."""
    lines = ["| method | ε | sites | skew | severity | seeds | pooled AUROC | "
             "pooled bal. acc. | site AUROC mean | worst site AUROC | KiB/round/site | "
             "% of full model | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, group in sorted(_grouped(rows, ("method", *POINT)).items(),
                             key=lambda kv: (kv[0][1:], kv[0][0])):
        method, eps, sites, skew, sev = key
        sent = group[0]["bytes_per_round_per_site"]
        frac = group[0]["bytes_fraction"]
        lines.append(
            f"| {method} | {_eps(eps)} | {sites} | {skew:g} | {sev:g} | {len(group)} | "
            f"{_fmt([r['pooled_auroc'] for r in group])} | "
            f"{_fmt([r['pooled_balanced_accuracy'] for r in group])} | "
            f"{_fmt([r['site_auroc_mean'] for r in group])} | "
            f"{_fmt([r['site_auroc_min'] for r in group])} | "
            f"{'n/a' if sent is None else f'{sent / 1024:.1f}'} | "
            f"{'n/a' if frac is None else f'{100 * frac:.2f}'} | "
            f"{_fmt([r['wall_seconds'] for r in group], 0)} |"
        )
    return "\n".join(lines)


def _site_means(sites: list[dict[str, Any]]) -> dict[tuple, float]:
    """Mean AUROC over seeds per (method, point, site)."""
    return {key: _mean(r["auroc"] for r in group)
            for key, group in _grouped(sites, ("method", *POINT, "site")).items()}


def _paired_spread(sites: list[dict[str, Any]], point: tuple, site: str) -> str:
    """The seed-paired difference fedshift - local at one site, as mean ± standard error."""
    by_seed = {(r["method"], r["seed"]): r["auroc"] for r in sites
               if tuple(r[k] for k in POINT) == point and r["site"] == site}
    diffs = [by_seed[("fedshift", seed)] - by_seed[("local", seed)]
             for (method, seed) in by_seed if method == "fedshift" and ("local", seed) in by_seed]
    if len(diffs) < 2:
        return ""
    return (f" (difference {statistics.fmean(diffs):+.3f} ± "
            f"{statistics.stdev(diffs) / math.sqrt(len(diffs)):.3f} over {len(diffs)} seeds)")


def check_claims(rows: list[dict[str, Any]], sites: list[dict[str, Any]]) -> list[Claim]:
    """The study's claims about fedshift, checked at every grid point that can test them."""
    claims = []
    per_site = _site_means(sites)
    points = sorted({tuple(r[k] for k in POINT) for r in rows if r["method"] == "fedshift"})
    pooled = {key: _mean(r["pooled_auroc"] for r in group)
              for key, group in _grouped(rows, ("method", *POINT)).items()}
    for point in points:
        where = (f"ε = {_eps(point[0])}, {point[1]} sites, skew {point[2]:g}, "
                 f"severity {point[3]:g}")
        names = sorted({k[-1] for k in per_site if k[:-1] == ("fedshift", *point)})
        pairs = [(n, per_site[("fedshift", *point, n)], per_site.get(("local", *point, n)))
                 for n in names]
        pairs = [(n, f, loc) for n, f, loc in pairs if loc is not None]
        if pairs:
            worse = [(n, f, loc) for n, f, loc in pairs if f < loc]
            evidence = "; ".join(f"{n}: {f:.3f} vs {loc:.3f}{_paired_spread(sites, point, n)}"
                                 for n, f, loc in pairs)
            claims.append(Claim(
                f"{where}: fedshift is at least as good as local-only at every site "
                "(site AUROC)", not worse, evidence))
        for rival in RIVALS:
            theirs = pooled.get((rival, *point))
            if theirs is None:
                continue
            ours = pooled[("fedshift", *point)]
            claims.append(Claim(
                f"{where}: fedshift beats {get_method(rival).summary} (pooled AUROC)",
                ours > theirs, f"{ours:.3f} vs {theirs:.3f}"))
    fractions = [r["bytes_fraction"] for r in rows if r["method"] == "fedshift"]
    if fractions:
        claims.append(Claim(
            f"fedshift sends at most {100 * BYTES_BOUND:g} % of the full model per round",
            max(fractions) <= BYTES_BOUND, f"{100 * max(fractions):.2f} %"))
    return claims


def _plot_epsilon(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    by_method = _grouped(rows, ("method",))
    finite = sorted({r["epsilon"] for r in rows if math.isfinite(r["epsilon"])})
    if not finite:
        return False
    inf_x = max(finite) * 4
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method,), group in sorted(by_method.items()):
        points = _grouped(group, ("epsilon",))
        xs = sorted(points, key=lambda k: k[0])
        x = [e if math.isfinite(e) else inf_x for (e,) in xs]
        y = [_mean(r["pooled_auroc"] for r in points[k]) for k in xs]
        ax.plot(x, y, marker="o", label=method)
    ax.set_xscale("log")
    ticks = [*finite, inf_x] if any(not math.isfinite(r["epsilon"]) for r in rows) else finite
    ax.set_xticks(ticks, [_eps(t) if t != inf_x else "∞" for t in ticks])
    ax.set_xlabel("ε per site")
    ax.set_ylabel("pooled test AUROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _saved(fig, path)


def _saved(fig: Any, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_fed_vs_local(sites: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    means = _site_means(sites)
    fig, ax = plt.subplots(figsize=(5, 5))
    plotted = False
    for method in sorted({k[0] for k in means} - {"local", "central"}):
        pairs = [(means[("local", *k[1:])], v) for k, v in means.items()
                 if k[0] == method and ("local", *k[1:]) in means]
        if pairs:
            ax.scatter(*zip(*pairs, strict=True), label=method, alpha=0.8)
            plotted = True
    if not plotted:
        plt.close(fig)
        return False
    lo = min(0.5, *ax.get_xlim(), *ax.get_ylim())
    ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("local-only site AUROC")
    ax.set_ylabel("federated site AUROC")
    ax.set_title("below the diagonal: negative transfer", fontsize=9)
    ax.legend(fontsize=8)
    return _saved(fig, path)


def _plot_cost(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    for (method,), group in sorted(_grouped(rows, ("method",)).items()):
        points = _grouped(group, ("sites",))
        xs = sorted(points)
        left.plot([n for (n,) in xs], [_mean(r["wall_seconds"] for r in points[k]) for k in xs],
                  marker="o", label=method)
        sent = [points[k][0]["bytes_per_round_per_site"] for k in xs]
        if all(s is not None for s in sent):
            right.plot([n for (n,) in xs], [s / 1024 for s in sent], marker="o", label=method)
    left.set_xlabel("sites")
    left.set_ylabel("wall time of the run (s)")
    right.set_xlabel("sites")
    right.set_ylabel("KiB sent per site and round")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _saved(fig, path)


def summarise(out_dir: Path, title: str = "study") -> dict[str, Any]:
    """Write the study's tables, plots and claims under ``out_dir``; return them."""
    import matplotlib

    matplotlib.use("Agg")
    cells = load_cells(out_dir)
    rows = [cell_row(r) for r in cells]
    sites = [row for r in cells for row in site_rows(r)]
    _write_csv(out_dir / "summary.csv", rows)
    _write_csv(out_dir / "sites.csv", sites)
    claims = check_claims(rows, sites)
    plots = [name for name, made in (
        ("epsilon.png", _plot_epsilon(rows, out_dir / "epsilon.png")),
        ("fed_vs_local.png", _plot_fed_vs_local(sites, out_dir / "fed_vs_local.png")),
        ("cost.png", _plot_cost(rows, out_dir / "cost.png")),
    ) if made]
    lines = [f"# {title}", "", f"{len(cells)} finished cells.", "", markdown_table(rows), ""]
    if claims:
        lines += ["## Claims", ""]
        lines += [f"- **{'holds' if c.holds else 'does not hold'}**: {c.text} ({c.evidence})"
                  for c in claims]
        lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows, "sites": sites, "claims": claims, "plots": plots}
