"""A small but complete run's results, as ``results.json`` holds them, for the report tests."""

from __future__ import annotations

from typing import Any

SITES = ("site-0", "site-1", "site-2")
BYTES_PER_SITE = 190_000


def _metrics(accuracy: float, nll: float, ece: float) -> dict[str, float]:
    return {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.02, "auroc": 0.9,
            "nll": nll, "ece": ece}


def _shift_site(score: float, flagged: bool, deployment: float) -> dict[str, Any]:
    return {
        "covariate_score": score, "covariate_threshold": 0.05, "covariate_flagged": flagged,
        "top_layers": [["backbone.blocks.0.0.bn1", 0.03], ["backbone.bn1", 0.02],
                       ["backbone.blocks.1.0.bn2", 0.01], ["backbone.blocks.2.0.bn1", 0.005]],
        "training_prior": [0.8, 0.2], "deployment_prior": [1 - deployment, deployment],
        "deployment_prior_bbse": [0.47, 0.53], "importance_weights": [1.28, 0.85],
        "concept_gap": 0.02, "concept_threshold": 0.2, "concept_flagged": False,
        "metrics": {"uncorrected": _metrics(0.8, 0.45, 0.06),
                    "corrected": _metrics(0.82, 0.41, 0.04)},
    }


def _truth(severity: float, shifted: bool) -> dict[str, Any]:
    return {"true_training_prior": [0.8, 0.2], "true_deployment_prior": [0.45, 0.55],
            "training_prior_l1": 0.01, "deployment_prior_l1": 0.03,
            "deployment_prior_bbse_l1": 0.05, "severity": severity,
            "covariate_kind": "blur" if shifted else "none", "shifted": shifted,
            "covariate_flagged": shifted, "concept": False, "concept_flagged": False}


def shift_record() -> dict[str, Any]:
    """Three rounds of covariate scores, final estimates and ground truth; site-2 has no
    correction metrics, no scoring entry and gaps."""
    final = {"site-0": _shift_site(0.012, False, 0.55), "site-1": _shift_site(0.2345, True, 0.7),
             "site-2": _shift_site(0.08, True, 0.3)}
    final["site-2"].update(metrics=None, deployment_prior_bbse=None, concept_gap=None)
    final["site-1"]["deployment_prior_interval"] = [[0.38, 0.62], [0.2, 0.8]]
    rounds = [{"round": r, "sites": {
        "site-0": {"covariate_score": 0.01 * r, "covariate_threshold": 0.05,
                   "covariate_flagged": False},
        "site-1": {"covariate_score": 0.1 * r, "covariate_threshold": 0.05,
                   "covariate_flagged": True},
        "site-2": {"covariate_score": None if r == 2 else 0.03 * r,
                   "covariate_threshold": 0.05, "covariate_flagged": None},
    }} for r in (1, 2, 3)]
    return {
        "rounds": rounds,
        "final": {"federation_prior": [0.35, 0.65], "sites": final},
        "refused": {},
        "scoring": {
            "sites": {"site-0": _truth(0.0, False), "site-1": _truth(0.8, True)},
            "spearman_covariate_severity": 0.97, "detection_rate": 0.5,
            "concept_detection_rate": 1.0,
        },
    }


def _site_row(index: int) -> dict[str, Any]:
    return {
        "name": SITES[index], "epsilon_spent": 0.99 - 0.01 * index, "delta": 1e-5,
        "accountant": "prv", "epsilon_prv": 0.99 - 0.01 * index, "epsilon_rdp": 1.08,
        "noise_multiplier": 5.32, "sample_rate": 0.143, "steps": 42,
        "epsilon_by_part": {"train": 0.95, "validation": 0.17, "deployment": 0.0, "test": 0.17},
        "epsilon_by_release": [
            {"mechanism": "dp-sgd", "part": "train", "count": 3, "epsilon": 0.91},
            {"mechanism": "moments", "part": "train", "count": 3, "epsilon": 0.3 + 0.01 * index},
            {"mechanism": "evaluation", "part": "test", "count": 2, "epsilon": 0.17},
        ],
        "composition": "sequential",
        "test": {"accuracy": 0.84, "balanced_accuracy": 0.80 + 0.01 * index,
                 "sensitivity": 0.83, "specificity": 0.77, "auroc": 0.903 + 0.01 * index,
                 "loss": 0.52},
        "operating_point": {"rule": "balanced", "temperature": 2.1, "bias": [1.4, -1.4],
                            "converged": True, "prior": [0.6, 0.4], "threshold": 0.404},
        "train_size": 896, "test_size": 145, "class_prior": [0.6, 0.4],
        "prevalence": 0.4 + 0.2 * index,
    }


def _round(number: int) -> dict[str, Any]:
    sites = {name: {"node": i, "train": {"weight": 1.0}, "update_norm": 10.0 - 2 * number + i,
                    "aggregation_weight": 1.0} for i, name in enumerate(SITES)}
    entry = {"round": number, "train": {}, "evaluate": {}, "sites": sites, "refused": {},
             "rejected": {}, "missing": {}, "seconds": {"train": 50.0 + number},
             "kept_global": None}
    if number == 2:  # site-2 is over its budget in round 2
        del sites["site-2"]
        entry["refused"] = {"site-2 (train)": "refused DP-SGD round 2: over budget"}
    if number >= 2:
        entry["evaluate"] = {"accuracy": 0.8, "balanced_accuracy": 0.70 + 0.05 * number,
                             "noise_std": 40.0, "sites": 3}
        entry["seconds"]["evaluate"] = 2.0
        for i, name in enumerate(sites):
            sites[name]["evaluate"] = {"accuracy": 0.8, "balanced_accuracy": 0.6 + 0.1 * i}
    return entry


def run_results() -> dict[str, Any]:
    """Three sites, three rounds (DP evaluations in rounds 2 and 3, a refusal in round 2),
    privacy by release, bytes, and a shift record with ground truth."""
    return {
        "config": {"dataset": "pneumoniamnist", "image-size": 64, "backbone": "efficientnet_lite0",
                   "mode": "bn+head", "num-rounds": 3, "num-classes": 2, "epsilon": 1.0,
                   "delta": 1e-5, "dp": True},
        "sites": [_site_row(i) for i in range(len(SITES))],
        "pooled_test": {"accuracy": 0.879, "balanced_accuracy": 0.86, "sensitivity": 0.919,
                        "specificity": 0.8, "auroc": 0.934, "loss": 0.4},
        "rounds": [_round(n) for n in (1, 2, 3)],
        "bytes_per_round_per_site": BYTES_PER_SITE,
        "full_model_bytes": 13_662_392,
        "trainable_parameters": 44_584,
        "bytes_fraction_of_full_model": BYTES_PER_SITE / 13_662_392,
        "shift": shift_record(),
    }
