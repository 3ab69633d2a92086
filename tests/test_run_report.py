"""``fedshift report``: the run report, as Markdown with plots and as one HTML page."""

from __future__ import annotations

import argparse
import base64
import copy
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from server.run_report import (
    HTML_FILE,
    MISSING,
    PLOTS_DIR,
    REPORT_FILE,
    load_run,
    write_report,
)
from simulations.report_command import add_report_parser, run_report
from simulations.simulation_report import write_simulation_report
from tests.report_results import SITES, run_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results() -> dict[str, Any]:
    return run_results()


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown(results: dict[str, Any], out: Path) -> str:
    return write_report(results, out).markdown.read_text()


def _headings(text: str) -> list[str]:
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def _plot(out: Path, key: str) -> bytes:
    return (out / PLOTS_DIR / f"{key}.png").read_bytes()


def test_the_report_leads_with_what_people_ask_first(results: dict[str, Any],
                                                     tmp_path: Path) -> None:
    files = write_simulation_report(results, tmp_path)
    assert (files.markdown, files.html) == (tmp_path / REPORT_FILE, tmp_path / HTML_FILE)
    text = files.markdown.read_text()
    assert text.startswith("# fedshift run report\n")
    assert _headings(text) == [
        "Test performance", "Learning curve", "Privacy spent", "Communication",
        "Refusals and dropped replies", "Covariate shift", "Label shift", "Concept shift",
        "Label-shift correction", "Against the ground truth", "Run settings",
    ]
    assert ("Run: 3 sites, 3 rounds, ε = 1 per site (δ = 1e-05), efficientnet_lite0 bn+head, "
            "pneumoniamnist at 64 px.") in text
    assert ("- Pooled test (435 images): AUROC 0.934, sensitivity 0.919, specificity 0.800, "
            "balanced accuracy 0.860, accuracy 0.879.") in text
    assert "- Privacy: the sites spent ε 0.970 to 0.990 of a budget of 1." in text
    assert "- Each site sends 185.5 KiB per round (1.39 % of the full model)." in text


def test_test_performance_per_site_at_its_operating_point(results: dict[str, Any],
                                                          tmp_path: Path) -> None:
    text = _markdown(results, tmp_path)
    assert _row("site", "prevalence", "train images", "test images", "AUROC", "sensitivity",
                "specificity", "balanced accuracy", "accuracy", "operating point",
                "ε spent") in text
    assert _row("site-1", "0.60", "896", "145", "0.913", "0.830", "0.770", "0.810", "0.840",
                "p ≥ 0.404 (balanced)", "0.980") in text
    assert _row("pooled test", "", "", "435", "0.934", "0.919", "0.800", "0.860", "0.879",
                "each site's own", "") in text


def test_own_models_say_which_site_is_better_off_alone(results: dict[str, Any],
                                                       tmp_path: Path) -> None:
    assert "Better off alone?" not in _markdown(results, tmp_path / "none")
    results["sites"][1]["own_model"] = {
        "weight": 0.25, "federated_loss": 0.41, "local_loss": 0.33, "alone_is_better": True,
        "decides_with_mix": False, "test_alone": {"auroc": 0.947},
        "test_mix": {"auroc": 0.951, "balanced_accuracy": 0.871}}
    results["pooled_test_mix"] = {"auroc": 0.938, "balanced_accuracy": 0.862}
    text = _markdown(results, tmp_path / "own")
    assert _headings(text)[1] == "Better off alone?"
    assert _row("site-1", "0.410", "0.330", "yes", "25% federated", "no", "0.913", "0.947",
                "0.951", "0.871") in text
    assert ("Pooled test with every site on its best mix: AUROC 0.938, balanced accuracy "
            "0.862.") in text


def test_learning_curve_per_round(results: dict[str, Any], tmp_path: Path) -> None:
    text = _markdown(results, tmp_path)
    # no site released its training loss: that column is left out
    assert _row("round", "updates used", "mean update norm", "balanced accuracy (DP)",
                "accuracy (DP)", "training time (s)", "evaluation time (s)") in text
    assert _row("1", "3 of 3", "9.000", MISSING, MISSING, "51.0", MISSING) in text
    assert _row("2", "2 of 3", "6.500", "0.800", "0.800", "52.0", "2.0") in text
    assert _row("3", "3 of 3", "5.000", "0.850", "0.800", "53.0", "2.0") in text
    assert "under DP in rounds 2, 3" in text
    assert "![Learning curve per round](plots/learning_curve.png)" in text
    assert _plot(tmp_path, "learning_curve").startswith(PNG_MAGIC)


def test_training_loss_joins_the_curve_when_sites_release_it(results: dict[str, Any],
                                                             tmp_path: Path) -> None:
    for entry in results["rounds"]:
        entry["train"]["train-loss"] = 0.9 / entry["round"]
    text = _markdown(results, tmp_path)
    assert "| train loss |" in text
    assert _row("3", "3 of 3", "5.000", "0.300", "0.850", "0.800", "53.0", "2.0") in text


def test_privacy_spent_with_its_breakdown_by_release(results: dict[str, Any],
                                                     tmp_path: Path) -> None:
    text = _markdown(results, tmp_path)
    assert _row("site", "ε spent", "ε budget", "accountant", "ε (PRV)", "ε (RDP)", "δ",
                "composition", "DP-SGD noise", "sample rate", "DP-SGD steps") in text
    assert _row("site-2", "0.970", "1", "PRV", "0.970", "1.080", "1e-05", "sequential", "5.32",
                "0.143", "42") in text
    assert _row("site", "dp-sgd on train, 3 releases", "moments on train, 3 releases",
                "evaluation on test, 2 releases") in text
    assert _row("site-1", "0.910", "0.310", "0.170") in text
    assert "less than their sum" in text
    assert _plot(tmp_path, "privacy").startswith(PNG_MAGIC)


def test_privacy_by_part_when_the_results_have_no_breakdown_by_release(
        results: dict[str, Any], tmp_path: Path) -> None:
    for site in results["sites"]:
        del site["epsilon_by_release"]
    text = _markdown(results, tmp_path)
    assert _row("site", "train", "validation", "deployment", "test") in text
    assert _row("site-0", "0.950", "0.170", "0.000", "0.170") in text


def test_a_run_without_privacy_says_so(results: dict[str, Any], tmp_path: Path) -> None:
    results["config"]["dp"] = False
    for site in results["sites"]:
        site.update(epsilon_spent=None, epsilon_by_release=None, accountant=None)
    text = _markdown(results, tmp_path)
    assert "no differential privacy" in text
    assert "| ε spent |" not in text and "ε budget" not in text
    assert not (tmp_path / PLOTS_DIR / "privacy.png").exists()


def test_bytes_sent_per_round(results: dict[str, Any], tmp_path: Path) -> None:
    text = _markdown(results, tmp_path)
    assert "44,584 trainable parameters: 185.5 KiB per site and direction per round" in text
    assert "1.39 % of the full model's 13.0 MiB" in text
    # round 2: three sites were sent the model, two updates came back (site-2 refused)
    assert _row("2", "3", "556.6 KiB", "2", "371.1 KiB") in text
    assert _row("3", "3", "556.6 KiB", "3", "556.6 KiB") in text


def test_refusals_are_listed_with_their_reasons(results: dict[str, Any],
                                                tmp_path: Path) -> None:
    results["rounds"][2]["missing"] = {"evaluate": ["site-0"]}
    text = _markdown(results, tmp_path)
    assert _row("2", "site-2 (train)", "refused", "refused DP-SGD round 2: over budget") in text
    assert _row("3", "site-0 (evaluate)", "no reply in time", "") in text


def test_shift_sections(results: dict[str, Any], tmp_path: Path) -> None:
    text = _markdown(results, tmp_path)
    assert _row("site-1", "0.234", "0.05", "yes",
                "blocks.0.0.bn1 (0.03), bn1 (0.02), blocks.1.0.bn2 (0.01)") in text
    assert "blocks.2.0.bn1" not in text  # only the first three layers
    assert _row("site-0", "20.0 %", "55.0 %", "53.0 %", "1.28, 0.85") in text
    assert "Federation prior: 65.0 %." in text
    assert _row("site-1", "20.0 %", "70.0 % (62.0 %-80.0 %)", "53.0 %", "1.28, 0.85") in text
    assert _row("site-0", "corrected", "0.820", "0.800", "0.900", "0.410", "0.040",
                "-0.040") in text
    # site-2's missing numbers are dashes, not errors
    assert _row("site-2", "20.0 %", "30.0 %", MISSING, "1.28, 0.85") in text
    assert _row("site-2", MISSING, "0.200", "no") in text
    assert _row("site-2", "corrected", *[MISSING] * 6) in text
    for key in ("covariate_scores", "priors", "correction"):
        assert f"](plots/{key}.png)" in text
        assert _plot(tmp_path, key).startswith(PNG_MAGIC)


def test_ground_truth_sections_only_for_simulations_with_injected_shifts(
        results: dict[str, Any], tmp_path: Path) -> None:
    text = write_simulation_report(results, tmp_path / "with").markdown.read_text()
    assert "## Against the ground truth" in text
    assert "severity: 0.970" in text
    assert "(shifted sites flagged): 50.0 %" in text
    assert "Concept detection rate: 100.0 %" in text
    assert "No ground truth for: site-2" in text
    assert _row("site-1", "20.0 %", "55.0 %", "0.010", "0.030", "0.050") in text
    assert _row("site-1", "blur", "0.80", "yes", "yes", "no", "no") in text
    assert _plot(tmp_path / "with", "prior_errors").startswith(PNG_MAGIC)

    # the report every run has leaves the simulation's ground truth out
    text = _markdown(results, tmp_path / "every run")
    assert "ground truth" not in text and "## Covariate shift" in text
    assert not (tmp_path / "every run" / PLOTS_DIR / "prior_errors.png").exists()

    del results["shift"]["scoring"]
    text = write_simulation_report(results, tmp_path / "without").markdown.read_text()
    assert "ground truth" not in text and "## Covariate shift" in text
    assert not (tmp_path / "without" / PLOTS_DIR / "prior_errors.png").exists()
    results["shift"]["scoring"] = {"detection_rate": 1.0}
    with pytest.raises(ValueError, match=r"'shift\.scoring' has no 'sites' object"):
        write_simulation_report(results, tmp_path / "malformed")


def test_shift_sections_appear_only_with_something_to_show(results: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """The default run: training priors and concept gaps, no deployment pools."""
    shift = results["shift"]
    del shift["scoring"]
    for site in shift["final"]["sites"].values():
        for key in ("deployment_prior", "deployment_prior_bbse", "importance_weights"):
            site.pop(key)
        site["metrics"] = None
    text = _markdown(results, tmp_path)
    assert "## Label-shift correction" not in text
    assert _row("site", "training prior") in text
    assert _row("site-1", "20.0 %") in text
    assert "## Concept shift" in text

    for site in shift["final"]["sites"].values():
        site["concept_gap"] = None
    shift["rounds"] = []
    for site in shift["final"]["sites"].values():
        site.pop("covariate_score")
    stale = tmp_path / PLOTS_DIR / "covariate_scores.png"
    assert stale.exists()
    text = _markdown(results, tmp_path)
    assert "## Concept shift" not in text and "## Covariate shift" not in text
    assert not stale.exists()  # a plot this report lacks does not survive from the last


def test_a_run_without_shift_estimates_has_the_common_sections(results: dict[str, Any],
                                                               tmp_path: Path) -> None:
    del results["shift"]
    text = _markdown(results, tmp_path)
    assert _headings(text)[:4] == ["Test performance", "Learning curve", "Privacy spent",
                                   "Communication"]
    assert not any("shift" in heading for heading in _headings(text))
    assert not (tmp_path / PLOTS_DIR / "covariate_scores.png").exists()


def test_more_than_two_classes_shows_prior_vectors(results: dict[str, Any],
                                                   tmp_path: Path) -> None:
    results["config"]["num-classes"] = 3
    shift = results["shift"]
    shift["final"]["federation_prior"] = [0.2, 0.3, 0.5]
    shift["final"]["sites"]["site-0"]["deployment_prior"] = [0.1, 0.6, 0.3]
    text = _markdown(results, tmp_path)
    assert "Federation prior: [0.20, 0.30, 0.50]." in text
    assert "[0.10, 0.60, 0.30]" in text


class _Page(HTMLParser):
    """The tables (id -> rows of cell texts) and images of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = found["id"] or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images[found["id"] or ""] = found["src"] or ""
        for name in ("href", "src"):
            if name in found and tag != "img":
                self.links.append(found[name] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_the_html_page_holds_the_same_tables_and_embeds_its_plots(
        results: dict[str, Any], tmp_path: Path) -> None:
    results["sites"][0]["name"] = "<b>ward & co</b>"
    page_text = write_simulation_report(results, tmp_path).html.read_text()
    page = _Page()
    page.feed(page_text)
    assert "<b>ward" not in page_text  # names are escaped
    performance = page.tables["test-performance"]
    assert performance[1][:2] == ["<b>ward & co</b>", "0.40"]
    assert [row[0] for row in performance[1:]] == ["<b>ward & co</b>", *SITES[1:],
                                                    "pooled test"]
    assert performance[2][4] == "0.913"
    assert page.tables["rounds"][2][:2] == ["2", "2 of 3"]
    assert {"privacy", "privacy-by-release", "bytes", "covariate-shift",
            "prior-errors"} <= set(page.tables)
    assert set(page.images) == {"learning_curve", "privacy", "covariate_scores", "priors",
                                "correction", "prior_errors"}
    for key, src in page.images.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]) == _plot(tmp_path, key)
    assert page.links == []  # nothing to fetch: the page stands alone


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedshift simulate --out"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="nothing to report"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"sites": [{"test": {}}]}))
    with pytest.raises(ValueError, match=r"'sites\[0\]' is not an object with a 'name'"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"shift": {"final": {"sites": []}}}))
    with pytest.raises(ValueError, match=r"'shift\.final' has no 'sites' object"):
        load_run(tmp_path)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedshift")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_command_writes_both_reports(
    results: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    assert run_report(_parse(["report", str(run_dir)])) == 0
    out = capsys.readouterr().out
    assert str(run_dir / REPORT_FILE) in out and str(run_dir / HTML_FILE) in out
    assert (run_dir / PLOTS_DIR / "learning_curve.png").is_file()
    assert "test-performance" in (run_dir / HTML_FILE).read_text()
    assert "## Against the ground truth" in (run_dir / REPORT_FILE).read_text()

    elsewhere = tmp_path / "elsewhere"
    assert run_report(_parse(["report", str(run_dir), "--out", str(elsewhere)])) == 0
    assert str(elsewhere / HTML_FILE) in capsys.readouterr().out
    assert (elsewhere / REPORT_FILE).is_file()
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
    assert not (tmp_path / REPORT_FILE).exists()
    assert not (tmp_path / HTML_FILE).exists()
