"""A run's metrics as TensorBoard event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from common.federation_config import ConfigError
from fedshift_cli import main
from simulations import cli
from simulations.trackers import require_tensorboard, run_scalars, write_tensorboard
from tests.report_results import BYTES_PER_SITE, SITES, run_results


@pytest.fixture
def results() -> dict[str, Any]:
    results = run_results()
    for entry in results["rounds"]:
        for figures in entry["sites"].values():
            figures["train"]["train-loss"] = 1.0 / entry["round"]
    return results


def _read(log_dir: Path) -> Any:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (fedshift[trackers])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def _series(accumulator: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in accumulator.Scalars(tag)]


def test_one_series_per_site_and_metric_read_back_by_tensorboard(
        results: dict[str, Any], tmp_path: Path) -> None:
    written = write_tensorboard(results, tmp_path / "tb")
    events = _read(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    assert written == sum(len(events.Scalars(tag)) for tag in tags)
    per_site = ("update_norm", "train_loss", "test_auroc", "epsilon", "covariate_score")
    for metric in per_site:
        assert {f"{metric}/{site}" for site in SITES} <= tags, metric
    # per round, as the history holds it: site-2 refused round 2, so it has no point there
    assert _series(events, "update_norm/site-0") == [(1, 8.0), (2, 6.0), (3, 4.0)]
    assert _series(events, "update_norm/site-2") == [(1, 10.0), (3, 6.0)]
    assert _series(events, "train_loss/site-1") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert _series(events, "dp_balanced_accuracy/federation") == [(2, 0.8), (3, 0.85)]
    assert _series(events, "dp_balanced_accuracy/site-1") == [(2, 0.7), (3, 0.7)]
    assert _series(events, "bytes_to_server/federation") == [
        (1, 3 * BYTES_PER_SITE), (2, 2 * BYTES_PER_SITE), (3, 3 * BYTES_PER_SITE)]
    assert _series(events, "covariate_score/site-1") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert _series(events, "covariate_score/site-2") == [(1, 0.03), (3, 0.09)]
    # after the last round: test metrics at the operating point, privacy, concept shift
    assert _series(events, "test_auroc/site-2") == [(3, 0.923)]
    assert _series(events, "test_auroc/pooled") == [(3, 0.934)]
    assert _series(events, "epsilon/site-1") == [(3, 0.98)]
    assert _series(events, "epsilon_moments_train/site-2") == [(3, 0.32)]
    assert _series(events, "concept_gap/site-0") == [(3, 0.02)]
    assert "settings/text_summary" in events.Tags()["tensors"]


def test_a_run_without_shift_or_privacy_has_no_such_series(results: dict[str, Any]) -> None:
    del results["shift"]
    for row in results["sites"]:
        row.update(epsilon_spent=None, epsilon_by_release=None)
    tags = {s.tag for s in run_scalars(results)}
    assert not any(t.startswith(("covariate", "concept", "epsilon")) for t in tags)
    assert "test_auroc/site-0" in tags


def test_a_missing_tensorboard_is_said_before_the_run(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'fedshift\[trackers\]'"):
        require_tensorboard()

    def no_run(*_: Any, **__: Any) -> None:
        raise AssertionError("the run started although tensorboard is missing")

    monkeypatch.setattr(cli, "_config", no_run)
    out = tmp_path / "run"
    assert main(["simulate", "--tensorboard", str(tmp_path / "tb"), "--out", str(out)]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "tb").exists()
