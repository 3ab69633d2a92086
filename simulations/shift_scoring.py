"""Score a run's shift estimates against the ground truth a scenario injected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from common.shift_estimators import ESTIMATORS


def _covered(interval: Sequence[Sequence[float]] | None, truth: Sequence[float]
             ) -> bool | None:
    """Whether a [low, high] per-class interval holds the true prior of every class."""
    if interval is None:
        return None
    low, high, true = (np.asarray(v, dtype=np.float64) for v in (*interval, truth))
    return bool(np.all((low <= true + 1e-12) & (true <= high + 1e-12)))


def _l1(estimate: Sequence[float] | None, truth: Sequence[float]) -> float | None:
    if estimate is None:
        return None
    return float(np.abs(np.asarray(estimate) - np.asarray(truth)).sum())


def _rate(hits: list[bool]) -> float | None:
    return float(np.mean(hits)) if hits else None


def score_shift(final: Mapping[str, Any], truths: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-site errors and flags against the truth, and the federation-wide scores.

    Parameters
    ----------
    final : Mapping
        The ``final`` part of a run's shift record (per-site estimates by name).
    truths : Sequence[Mapping]
        Per site: ``name``, ``training_prior``, ``deployment_prior``,
        ``covariate_kind``, ``severity`` and ``concept_fraction``.

    Returns
    -------
    dict
        ``sites`` (per-site L1 prior errors, whether each estimator's 90 % interval
        covers the true deployment prior, flags and truth), the coverage of each
        estimator's intervals over the sites (``deployment_prior_coverage`` for the
        primary estimate, ``deployment_prior_<name>_coverage`` per estimator), the Spearman
        correlation of covariate scores with injected severity, the detection rate
        (shifted sites flagged), the false-flag rate (unshifted sites flagged) and
        the same two rates for concept shift.
    """
    sites: dict[str, Any] = {}
    for truth in truths:
        est = final.get("sites", {}).get(truth["name"], {})
        shifted = truth["covariate_kind"] != "none" and truth["severity"] > 0
        metrics = est.get("metrics") or {}
        before = (metrics.get("uncorrected") or {}).get("nll")
        after = (metrics.get("corrected") or {}).get("nll")
        sites[truth["name"]] = {
            "true_training_prior": list(truth["training_prior"]),
            "true_deployment_prior": list(truth["deployment_prior"]),
            "training_prior_l1": _l1(est.get("training_prior"), truth["training_prior"]),
            "deployment_prior_l1": _l1(est.get("deployment_prior"), truth["deployment_prior"]),
            "deployment_prior_covered": _covered(est.get("deployment_prior_interval"),
                                                 truth["deployment_prior"]),
            **{k: v for e in ESTIMATORS.values()
               for k, v in e.score(est, truth["deployment_prior"]).items()},
            "prevalence_change": float(truth["deployment_prior"][-1]
                                       - truth["training_prior"][-1]),
            "covariate_kind": truth["covariate_kind"], "severity": float(truth["severity"]),
            "shifted": shifted, "covariate_score": est.get("covariate_score"),
            "covariate_flagged": est.get("covariate_flagged"),
            "concept": truth["concept_fraction"] > 0,
            "concept_flagged": est.get("concept_flagged"),
            "nll_uncorrected": before, "nll_corrected": after,
            "correction_lowers_nll": None if before is None or after is None else after < before,
        }
    scored = [s for s in sites.values() if s["covariate_score"] is not None]
    spearman = None
    if len(scored) >= 3 and len({s["severity"] for s in scored}) > 1:
        spearman = float(spearmanr([s["severity"] for s in scored],
                                   [s["covariate_score"] for s in scored]).statistic)
    flagged = [s for s in scored if s["covariate_flagged"] is not None]
    concept = [s for s in sites.values() if s["concept_flagged"] is not None]
    coverage_keys = ["deployment_prior_covered",
                     *(f"{e.key}_covered" for e in ESTIMATORS.values())]
    return {
        "sites": sites,
        **{key.replace("_covered", "_coverage"): _rate(
            [s[key] for s in sites.values() if s[key] is not None]) for key in coverage_keys},
        "spearman_covariate_severity": spearman,
        "detection_rate": _rate([s["covariate_flagged"] for s in flagged if s["shifted"]]),
        "false_flag_rate": _rate([s["covariate_flagged"] for s in flagged if not s["shifted"]]),
        "concept_detection_rate": _rate([s["concept_flagged"] for s in concept if s["concept"]]),
        "concept_false_flag_rate": _rate([s["concept_flagged"] for s in concept
                                          if not s["concept"]]),
        "max_deployment_prior_l1": max((s["deployment_prior_l1"] for s in sites.values()
                                        if s["deployment_prior_l1"] is not None), default=None),
    }
