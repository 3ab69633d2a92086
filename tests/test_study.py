"""Study files expand into the right cells, cells resume, summaries check their claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.data.splits import SiteData
from simulations.study import (
    Cell,
    StudyError,
    cell_config,
    load_study,
    parse_study,
    prepare_cell,
    run_study,
    shifted_sites,
)
from simulations.study_summary import check_claims, markdown_table, summarise

STUDY = {
    "name": "t",
    "seeds": [0, 1],
    "federation": {"image_size": 16, "num_rounds": 1},
    "methods": {"head": {"lr": 0.2}},
    "grid": [
        {"methods": ["fedshift", "head"], "epsilon": [1.0, math.inf], "sites": [2, 3]},
        {"methods": ["fedshift"], "epsilon": [1.0], "sites": [2], "seeds": [0, 5]},
    ],
}


def test_grids_expand_to_their_product_once_each() -> None:
    study = parse_study(STUDY)
    assert len(study.cells) == 2 * 2 * 2 * 2 + 1  # the second grid adds only seed 5
    assert Cell("fedshift", 1.0, 2, 0.0, 0.0, 5) in study.cells
    assert len(set(study.cells)) == len(study.cells)


@pytest.mark.parametrize(("change", "message"), [
    ({"grid": [{"methods": ["fedsgd"]}]}, "unknown method 'fedsgd'"),
    ({"grid": [{"methods": ["local"], "epsilons": [1]}]}, "unknown keys"),
    ({"grid": [{"methods": ["local"], "epsilon": [0]}]}, "epsilon must be > 0"),
    ({"grid": []}, "no \\[\\[grid\\]\\]"),
    ({"federation": {"num_sites": 3}}, "set per cell"),
    ({"federation": {"lr_schedule": 3}}, "unknown setting"),
    ({"methods": {"head": {"epsilon": 2}}}, "set per cell"),
    ({"seeds": [0.5]}, "integers"),
    ({"variants": {"fast": {"lr": 2.0}}}, "needs method ="),
    ({"variants": {"fast": {"method": "fedsgd"}}}, "unknown method 'fedsgd'"),
    ({"variants": {"head": {"method": "fedshift"}}}, "registered method; give the variant"),
    ({"variants": {"fast": {"method": "fedshift", "epsilon": 2}}}, "set per cell"),
])
def test_bad_study_files_name_the_problem(change: dict, message: str) -> None:
    with pytest.raises(StudyError, match=message):
        parse_study({**STUDY, **change})


def test_bad_toml_and_missing_file_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("grid = [")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(bad)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "none.toml")


def test_cell_config_applies_point_method_and_nonprivate_settings(tmp_path: Path) -> None:
    study = parse_study(STUDY)
    private = cell_config(study, Cell("head", 1.0, 3, 0.0, 0.0, 1), "", tmp_path)
    assert (private.mode, private.lr, private.dp, private.epsilon) == ("head", 0.2, True, 1.0)
    assert private.num_sites == 3 and len(private.prevalences) == 3
    assert private.seed == 1 and not private.shift and private.image_size == 16
    open_run = cell_config(study, Cell("fedshift", math.inf, 4, 0.5, 0.0, 0), "", tmp_path)
    assert (open_run.dp, open_run.lr, open_run.optimizer, open_run.label_skew) == (
        False, 0.003, "adam", 0.5)
    assert open_run.prevalences == (0.4, 0.6, 0.75, 0.9)


def test_a_variant_runs_its_method_with_its_own_settings(tmp_path: Path) -> None:
    study = parse_study({**STUDY, "variants": {"head-fast": {"method": "head", "lr": 2.0}},
                         "grid": [{"methods": ["head-fast", "head"], "epsilon": [1.0]}]})
    assert {c.method for c in study.cells} == {"head-fast", "head"}
    fast = cell_config(study, Cell("head-fast", 1.0, 4, 0.0, 0.0, 0), "", tmp_path)
    plain = cell_config(study, Cell("head", 1.0, 4, 0.0, 0.0, 0), "", tmp_path)
    assert (fast.mode, fast.lr, plain.lr) == ("head", 2.0, 0.2)
    cell_dir, done = prepare_cell(study, Cell("head-fast", 1.0, 4, 0.0, 0.0, 0), tmp_path, "")
    assert not done
    assert json.loads((cell_dir / "cell.json").read_text())["method"] == "head"


def _site(name: str) -> SiteData:
    images = {s: torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
              for s in ("train", "val", "test")}
    labels = {s: torch.tensor([0, 1, 0, 1]) for s in images}
    return SiteData(name, images, labels, 2)


def test_covariate_shift_reaches_odd_sites_only_and_is_seeded() -> None:
    sites = tuple(_site(f"site-{i}") for i in range(4))
    shifted = shifted_sites(sites, 2.0, seed=3)
    for i, (before, after) in enumerate(zip(sites, shifted, strict=True)):
        same = torch.equal(before.images["train"], after.images["train"])
        assert same == (i % 2 == 0)
    again = shifted_sites(sites, 2.0, seed=3)
    assert torch.equal(again[1].images["test"], shifted[1].images["test"])
    assert shifted_sites(sites, 0.0, seed=3) == sites


def test_finished_cells_are_reused_changed_ones_refused_unfinished_wiped(tmp_path: Path) -> None:
    study = parse_study(STUDY)
    cell = study.cells[0]
    cell_dir, finished = prepare_cell(study, cell, tmp_path, "")
    assert not finished
    (cell_dir / "state").mkdir()
    (cell_dir / "state" / "ledger.json").write_text("{}")
    cell_dir, finished = prepare_cell(study, cell, tmp_path, "")
    assert not finished and not (cell_dir / "state").exists()  # unfinished: run afresh
    (cell_dir / "results.json").write_text("{}")
    assert prepare_cell(study, cell, tmp_path, "") == (cell_dir, True)
    changed = parse_study({**STUDY, "federation": {"image_size": 24, "num_rounds": 1}})
    with pytest.raises(StudyError, match="other settings"):
        prepare_cell(changed, cell, tmp_path, "")


def _results(method: str, site_aurocs: list[float], pooled: float, fraction: float | None,
             seed: int = 0) -> dict:
    return {
        "cell": {"method": method, "epsilon": 1.0, "sites": len(site_aurocs),
                 "label_skew": 0.0, "severity": 0.0, "seed": seed},
        "sites": [{"name": f"site-{i}", "train_size": 10, "epsilon_spent": 0.9,
                   "test": {"auroc": a, "balanced_accuracy": a, "accuracy": a, "loss": 0.5}}
                  for i, a in enumerate(site_aurocs)],
        "pooled_test": {"auroc": pooled, "balanced_accuracy": pooled, "accuracy": pooled,
                        "loss": 0.5},
        "bytes_per_round_per_site": None if fraction is None else int(fraction * 1000),
        "bytes_fraction_of_full_model": fraction, "trainable_parameters": 10,
        "wall_seconds": 1.0,
    }


def _claims(cells: list[dict]) -> dict[str, bool]:
    from simulations.study_summary import cell_row, site_rows

    rows = [cell_row(c) for c in cells]
    sites = [r for c in cells for r in site_rows(c)]
    return {c.text.split(": ", 1)[-1]: c.holds for c in check_claims(rows, sites)}


def test_claims_catch_negative_transfer_and_weaker_rivals() -> None:
    cells = [_results("fedshift", [0.9, 0.8], 0.85, 0.014),
             _results("local", [0.7, 0.85], 0.7, 0.0),
             _results("head", [0.8, 0.8], 0.8, 0.0001),
             _results("gn-full", [0.9, 0.9], 0.9, 1.0)]
    claims = _claims(cells)
    assert claims == {
        "fedshift is at least as good as local-only at every site (site AUROC)": False,
        "fedshift beats federated head-only (linear probe) (pooled AUROC)": True,
        "fedshift beats federated full fine-tuning, BatchNorm -> GroupNorm (pooled AUROC)": False,
        "fedshift sends at most 2 % of the full model per round": True,
    }
    # Averaged over seeds, a site that is worse in one seed only can still hold.
    cells += [_results("fedshift", [0.9, 0.95], 0.85, 0.014, seed=1),
              _results("local", [0.7, 0.85], 0.7, 0.0, seed=1)]
    claims = _claims(cells)
    assert claims["fedshift is at least as good as local-only at every site (site AUROC)"]


def test_summary_writes_tables_plots_and_claims(tmp_path: Path) -> None:
    no_dp = _results("fedshift", [0.95, 0.9], 0.93, 0.014)
    no_dp["cell"]["epsilon"] = None  # how results.json stores epsilon = inf
    cells = [_results("fedshift", [0.9, 0.8], 0.85, 0.014),
             _results("local", [0.7, 0.75], 0.7, 0.0), no_dp]
    for i, c in enumerate(cells):
        (tmp_path / "cells" / str(i)).mkdir(parents=True)
        (tmp_path / "cells" / str(i) / "results.json").write_text(json.dumps(c))
    out = summarise(tmp_path, "Study t")
    assert len(out["rows"]) == 3 and len(out["sites"]) == 6
    text = (tmp_path / "summary.md").read_text()
    assert "| fedshift | 1 | 2 |" in text and "| fedshift | ∞ | 2 |" in text
    assert "**holds**" in text
    assert {"epsilon.png", "fed_vs_local.png", "cost.png"} <= set(out["plots"])
    assert all((tmp_path / p).stat().st_size > 1000 for p in out["plots"])
    assert (tmp_path / "summary.csv").read_text().count("\n") == 4
    assert "n/a" in markdown_table([{**out["rows"][0], "bytes_per_round_per_site": None,
                                     "bytes_fraction": None}])


@pytest.mark.slow
def test_study_runs_every_method_once_and_resumes(small_pneumonia_dir: Path,
                                                   tmp_path: Path) -> None:
    study = parse_study({
        "name": "e2e", "federation": {"image_size": 16, "num_rounds": 1, "local_epochs": 1},
        "grid": [{"methods": ["fedshift", "local", "central", "fedbn"], "sites": [2]},
                 {"methods": ["central"], "sites": [2], "epsilon": [math.inf]}],
    })
    outcomes = run_study(study, tmp_path, str(small_pneumonia_dir))
    assert sorted(o.status for o in outcomes) == ["done"] * 5, [o.detail for o in outcomes]
    results = {o.cell.label(): json.loads((o.cell_dir / "results.json").read_text())
               for o in outcomes}
    local = results["local-eps1-n2-skew0-sev0-seed0"]
    assert all(0.9 < s["epsilon_spent"] <= 1.0 for s in local["sites"])
    assert local["bytes_per_round_per_site"] == 0
    central = results["central-eps1-n2-skew0-sev0-seed0"]
    assert central["sites"][0]["ledger"].endswith("pooled.json")
    assert central["bytes_per_round_per_site"] is None
    assert results["central-epsinf-n2-skew0-sev0-seed0"]["sites"][0]["epsilon_spent"] is None
    fedbn_dir = next(o.cell_dir for o in outcomes if o.cell.method == "fedbn")
    personal = sorted((fedbn_dir / "state" / "ledgers" / "personal").glob("*.npz"))
    assert [p.name.split("-")[:2] for p in personal] == [["site", "0"], ["site", "1"]]
    again = run_study(study, tmp_path, str(small_pneumonia_dir))
    assert [o.status for o in again] == ["reused"] * 5


def test_a_second_study_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    from simulations.study import _locked

    with _locked(tmp_path), pytest.raises(StudyError, match="another fedshift study"):
        run_study(parse_study(STUDY), tmp_path)
