"""The fedshift command line: bad input gives a clear error and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data import medmnist_npz
from fedshift_cli import main


class _Captured(Exception):
    """Raised by a stand-in for the simulation, carrying what it was called with."""


def test_unknown_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--backbone", "resnet1000"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet1000'" in capsys.readouterr().err


def test_non_positive_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--epsilon", "0"]) == 2
    assert "epsilon must be a finite number > 0" in capsys.readouterr().err


def test_adapted_norm_settings_reach_the_run_config_and_its_checks(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--adapt-norm-layers", "-1"]) == 2
    assert "adapt-norm-layers must be >= 0 (0: off), got -1" in capsys.readouterr().err
    assert main(["simulate", "--adapt-norm-layers", "1", "--adapt-norm-noise", "0"]) == 2
    assert "adapt-norm-noise must be a finite number > 0" in capsys.readouterr().err


def test_missing_data_file_names_file_and_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline (downloads fail in tests), a data set the package does not ship."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    assert main(["simulate", "--dataset", "bloodmnist", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bloodmnist.npz not found" in err
    assert str(tmp_path / ".medmnist" / "bloodmnist.npz") in err


def test_the_default_runs_offline_on_the_shipped_copy_and_says_so_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No data file anywhere, no network: the run reads the shipped file and its first
    line says which file, at which size, and where the native one would go."""
    def capture(cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise _Captured(cfg)

    monkeypatch.setattr("simulations.runner.simulate", capture)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    with pytest.raises(_Captured) as captured:
        main(["simulate", "--out", str(tmp_path / "out")])
    assert captured.value.args[0].num_classes == 2
    first_line = capsys.readouterr().out.splitlines()[0]
    shipped = medmnist_npz.SHIPPED_DIR / "pneumoniamnist.npz"
    assert first_line == (
        f"data: {shipped} (shipped copy, 28 px, upsampled to 64 px); place "
        f"pneumoniamnist_64.npz in {tmp_path / '.medmnist'} for native resolution")


def test_prevalences_must_be_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--prevalences", "0.2,high"]) == 2
    assert "--prevalences" in capsys.readouterr().err


def test_earlier_run_in_out_is_not_overwritten_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state" / "ledgers").mkdir(parents=True)
    assert main(["simulate", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "state" / "ledgers").is_dir()


def test_negative_update_norm_bound(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--max-update-norm", "-1"]) == 2
    assert "max-update-norm must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_with_an_empty_home_and_no_network_the_default_command_runs_to_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first command on a fresh machine (downloads fail in tests), cut to a
    small slice: it reads the shipped copy and writes results.json and both reports."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    out = tmp_path / "run"
    assert main(["simulate", "--image-size", "16", "--rounds", "1", "--local-epochs", "1",
                 "--prevalences", "0.5,0.8", "--own-model-epochs", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"data: {medmnist_npz.SHIPPED_DIR / 'pneumoniamnist.npz'} "
                              "(shipped copy, 28 px")
    results = json.loads((out / "results.json").read_text())
    assert [s["epsilon_spent"] <= 1.0 for s in results["sites"]] == [True, True]
    assert all("own_model" in s for s in results["sites"])
    assert "## Test performance" in (out / "report.md").read_text()
    assert 'id="test-performance"' in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_ten_class_data_set_runs_with_label_skew_and_fedbn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_image_datasets import write_fashion

    write_fashion(tmp_path / "fashion", train_per_class=40, test_per_class=8)
    out = tmp_path / "run"
    code = main(["simulate", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fashion"),
                 "--sites", "2", "--label-skew", "5", "--rounds", "1", "--local-epochs", "1",
                 "--image-size", "16", "--batch-size", "16", "--personal-bn", "--no-shift",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num-classes"] == 10 and results["config"]["in-channels"] == 1
    assert [s["prevalence"] for s in results["sites"]] == [None, None]
    assert all(len(s["class_prior"]) == 10 for s in results["sites"])
    assert 0 < results["pooled_test"]["auroc"] <= 1
    assert len(list((out / "state" / "ledgers" / "personal").glob("site-*.npz"))) == 2
    printed = capsys.readouterr().out
    assert "site-0" in printed
    # a run without shift estimates has its report too
    assert f"report: {out / 'report.md'} and {out / 'report.html'}" in printed
    assert 'id="test-performance"' in (out / "report.html").read_text()


@pytest.mark.parametrize(("flags", "expected"), [
    ([], ("sgd", 1.0, 0.8)),
    (["--no-dp"], ("adam", 0.003, 0.7)),
    (["--no-dp", "--lr", "0.01", "--optimizer", "sgd"], ("sgd", 0.01, 0.7)),
])
def test_the_product_picks_its_recipe_for_the_privacy_asked_and_flags_win(
    small_pneumonia_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    flags: list[str], expected: tuple[str, float, float],
) -> None:
    def capture(cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise _Captured(cfg)

    monkeypatch.setattr("simulations.runner.simulate", capture)
    with pytest.raises(_Captured) as captured:
        main(["simulate", "--data-dir", str(small_pneumonia_dir), "--out", str(tmp_path),
              *flags])
    cfg = captured.value.args[0]
    assert (cfg.optimizer, cfg.lr, cfg.lr_decay) == expected
