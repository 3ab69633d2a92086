"""``fedshift report``: the Markdown report and plots of a run's shift estimates."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from server.run_report import MISSING, PLOT_FILES, PLOTS_DIR, load_run, write_report
from simulations.report_command import add_report_parser, run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("site-0", "site-1", "site-2")


def _metrics(accuracy: float, nll: float, ece: float) -> dict[str, float]:
    return {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.02, "auroc": 0.9,
            "nll": nll, "ece": ece}


def _site(score: float, flagged: bool, deployment: float) -> dict[str, Any]:
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


@pytest.fixture
def results() -> dict[str, Any]:
    """Three sites, three rounds; site-2 has no metrics, no scoring entry and gaps."""
    final = {"site-0": _site(0.012, False, 0.55), "site-1": _site(0.2345, True, 0.7),
             "site-2": _site(0.08, True, 0.3)}
    final["site-2"].update(metrics=None, deployment_prior_bbse=None, concept_gap=None)
    rounds = [{"round": r, "sites": {
        "site-0": {"covariate_score": 0.01 * r, "covariate_threshold": 0.05,
                   "covariate_flagged": False},
        "site-1": {"covariate_score": 0.1 * r, "covariate_threshold": 0.05,
                   "covariate_flagged": True},
        "site-2": {"covariate_score": None if r == 2 else 0.03 * r,
                   "covariate_threshold": 0.05, "covariate_flagged": None},
    }} for r in (1, 2, 3)]
    return {
        "config": {"num-rounds": 3, "epsilon": 1.0, "dp": True, "backbone": "efficientnet_lite0"},
        "shift": {
            "rounds": rounds,
            "final": {"federation_prior": [0.35, 0.65], "sites": final},
            "scoring": {
                "sites": {"site-0": _truth(0.0, False), "site-1": _truth(0.8, True)},
                "spearman_covariate_severity": 0.97, "detection_rate": 0.5,
                "concept_detection_rate": 1.0,
            },
        },
    }


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _check_plots(report: Path, text: str) -> None:
    for name in PLOT_FILES:
        path = report.parent / PLOTS_DIR / name
        assert f"]({PLOTS_DIR}/{name})" in text
        data = path.read_bytes()
        assert len(data) > len(PNG_MAGIC)
        assert data.startswith(PNG_MAGIC)


def test_report_names_sites_numbers_and_plots(results: dict[str, Any], tmp_path: Path) -> None:
    report = write_report(results, tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for site in SITES:
        assert site in text
    assert "Run: 3 sites, 3 rounds, ε = 1 per site." in text
    assert "| site-1 | 0.234 | 0.050 | yes | blocks.0.0.bn1 (0.030), bn1 (0.020), " \
           "blocks.1.0.bn2 (0.010) |" in text
    assert "blocks.2.0.bn1" not in text  # only the first three layers
    assert "| site-0 | 20.0 % | 55.0 % | 53.0 % | 1.28, 0.85 |" in text
    assert "Federation prior: 65.0 %." in text
    assert "| site-0 | corrected | 0.820 | 0.800 | 0.900 | 0.410 | 0.040 | -0.040 |" in text
    # site-2's missing numbers are dashes, not errors
    assert _row("site-2", "20.0 %", "30.0 %", MISSING, "1.28, 0.85") in text
    assert _row("site-2", MISSING, "0.200", "no") in text
    assert _row("site-2", "corrected", *[MISSING] * 6) in text
    # ground truth
    assert "## Against the ground truth" in text
    assert "severity: 0.970" in text
    assert "(sites whose flag is right): 50.0 %" in text
    assert "Concept detection rate: 100.0 %" in text
    assert "No ground truth for: site-2" in text
    assert "| site-1 | 20.0 % | 55.0 % | 0.010 | 0.030 | 0.050 |" in text
    assert "| site-1 | blur | 0.80 | yes | yes | no | no |" in text
    _check_plots(report, text)
    assert sorted(p.name for p in (tmp_path / PLOTS_DIR).iterdir()) == sorted(PLOT_FILES)


def test_report_without_scoring(results: dict[str, Any], tmp_path: Path) -> None:
    del results["shift"]["scoring"]
    del results["config"]
    text = write_report(results, tmp_path).read_text()
    assert "ground truth" not in text
    assert "Run: 3 sites, 3 rounds." in text
    for site in SITES:
        assert site in text
    _check_plots(tmp_path / "report.md", text)


def test_more_than_two_classes_shows_vectors_and_l1(
    results: dict[str, Any], tmp_path: Path
) -> None:
    shift = results["shift"]
    shift["final"]["federation_prior"] = [0.2, 0.3, 0.5]
    shift["final"]["sites"]["site-0"]["deployment_prior"] = [0.1, 0.6, 0.3]
    text = write_report(results, tmp_path).read_text()
    assert "Federation prior: [0.20, 0.30, 0.50]." in text
    assert "[0.10, 0.60, 0.30]" in text
    assert (tmp_path / PLOTS_DIR / "priors.png").read_bytes().startswith(PNG_MAGIC)


def test_report_without_any_metric(results: dict[str, Any], tmp_path: Path) -> None:
    shift = results["shift"]
    shift["rounds"] = []
    shift["final"]["sites"] = {name: {} for name in SITES}
    del shift["scoring"]
    stale = tmp_path / PLOTS_DIR / "priors.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)
    text = write_report(results, tmp_path).read_text()
    for site in SITES:
        assert _row(site, *[MISSING] * 4) in text
    assert "_(no covariate scores per round)_" in text
    assert not any((tmp_path / PLOTS_DIR).iterdir())


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedshift simulate --out"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"sites": []}))
    with pytest.raises(ValueError, match="no 'shift' section"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"shift": {"final": {"sites": []}}}))
    with pytest.raises(ValueError, match=r"'shift\.final' has no 'sites' object"):
        load_run(tmp_path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedshift")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_command_writes_report(
    results: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    assert run_report(_parse(["report", str(run_dir)])) == 0
    assert str(run_dir / "report.md") in capsys.readouterr().out
    assert (run_dir / PLOTS_DIR / "priors.png").is_file()

    elsewhere = tmp_path / "elsewhere"
    assert run_report(_parse(["report", str(run_dir), "--out", str(elsewhere)])) == 0
    assert str(elsewhere / "report.md") in capsys.readouterr().out
    assert load_run(run_dir) == copy.deepcopy(results)


def test_command_missing_and_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert run_report(_parse(["report", str(missing)])) == 2
    err = capsys.readouterr().err
    assert str(missing / "results.json") in err
    assert "fedshift simulate --out" in err

    (tmp_path / "results.json").write_text("[1, 2]")
    assert run_report(_parse(["report", str(tmp_path)])) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
