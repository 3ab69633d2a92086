"""A simulated run's report: the server's report with how its shift estimates compare
with the shifts the simulation injected.

Only a simulation knows the true shifts. Its results carry them, scored against
the server's estimates, in ``shift.scoring``
(:func:`simulations.shift_scoring.score_shift`); :func:`write_simulation_report`
adds :func:`ground_truth_sections` to the report every run has
(:func:`server.run_report.write_report`), after its shift estimates and before
the run's settings. ``fedshift simulate --out`` and ``fedshift report`` write
the report this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.report_document import Block, Bullets, Heading, Paragraph, ReportFiles
from server.report_plots import Panel, Series
from server.run_report import (
    MISSING,
    _flag,
    _get,
    _num,
    _percent,
    _plot,
    _prior,
    _table,
    _vector,
    check_shape,
    site_names,
    write_report,
)

GROUND_TRUTH_PLOTS = ("prior_errors",)
"""Every plot :func:`ground_truth_sections` may make."""


def write_simulation_report(results: dict[str, Any], out_dir: Path) -> ReportFiles:
    """Write the run's report (:func:`server.run_report.write_report`) into ``out_dir``,
    with the ground-truth sections where the results hold ``shift.scoring``.

    Raises
    ------
    ValueError
        ``results`` is not shaped as a run's results, or its ``shift.scoring`` has
        no ``sites`` object.
    """
    check_shape(results)
    scoring = (results.get("shift") or {}).get("scoring")
    extra: list[Block] = []
    if scoring is not None:
        if not isinstance(scoring, dict) or not isinstance(scoring.get("sites"), dict):
            raise ValueError("'shift.scoring' has no 'sites' object")
        names = site_names(results)
        names += [name for name in scoring["sites"] if name not in names]
        extra = ground_truth_sections(scoring, names)
    return write_report(results, out_dir, extra, GROUND_TRUTH_PLOTS)


def ground_truth_sections(scoring: dict[str, Any], names: list[str]) -> list[Block]:
    """How the shift estimates compare with the shifts a simulation injected.

    Parameters
    ----------
    scoring : dict
        A simulation's ``shift.scoring`` (:func:`simulations.shift_scoring.score_shift`).
    names : list[str]
        The run's sites, in report order.
    """
    table = scoring["sites"]
    known = [s for s in names if s in table]
    binary = all(len(v) == 2 for s in known for key in ("true_training_prior",
                                                        "true_deployment_prior")
                 if (v := _vector(_get(table, s, key))) is not None)
    items = [f"Spearman correlation of covariate score with severity: "
             f"{_num(scoring.get('spearman_covariate_severity'))}",
             f"Covariate detection rate (shifted sites flagged): "
             f"{_percent(scoring.get('detection_rate'))}"]
    if "false_flag_rate" in scoring:
        items.append(f"Covariate false-flag rate (unshifted sites flagged): "
                     f"{_percent(scoring['false_flag_rate'])}")
    if "concept_detection_rate" in scoring:
        items.append(f"Concept detection rate: {_percent(scoring['concept_detection_rate'])}")
    unknown = [s for s in names if s not in table]
    if unknown:
        items.append(f"No ground truth for: {', '.join(unknown)}")
    errors = [[s, _prior(_get(table, s, "true_training_prior"), binary),
               _prior(_get(table, s, "true_deployment_prior"), binary),
               _num(_get(table, s, "training_prior_l1")),
               _num(_get(table, s, "deployment_prior_l1")),
               _num(_get(table, s, "deployment_prior_bbse_l1"))] for s in known]
    flags = [[s, str(_get(table, s, "covariate_kind") or MISSING),
              _num(_get(table, s, "severity"), digits=2), _flag(_get(table, s, "shifted")),
              _flag(_get(table, s, "covariate_flagged")), _flag(_get(table, s, "concept")),
              _flag(_get(table, s, "concept_flagged"))] for s in known]
    panels = [Panel("bars", known, [
        Series(label, [_get(table, s, key) for s in known]) for label, key in (
            ("training", "training_prior_l1"), ("deployment (MLLS)", "deployment_prior_l1"),
            ("deployment (BBSE)", "deployment_prior_bbse_l1"))],
        "L1 error of the prior estimates", "L1 error")]
    return [
        Heading("Against the ground truth"),
        Paragraph("This simulation injected known shifts; here is how the estimates above "
                  "compare with them."),
        Bullets(tuple(items)),
        _table("prior-errors", ["site", "true training prior", "true deployment prior",
                                "L1 training", "L1 deployment (MLLS)", "L1 deployment (BBSE)"],
               errors, "L1 error of the prior estimates against the true priors."),
        _table("shift-flags", ["site", "covariate kind", "severity", "shifted",
                               "covariate flagged", "concept shift", "concept flagged"], flags,
               "Flags against the simulated shifts."),
        *_plot("prior_errors", "L1 error of the prior estimates per site", panels),
    ]
