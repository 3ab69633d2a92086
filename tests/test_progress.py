"""Progress people can trust: the server reports each phase of a round, and the command
line's bar shows round, phase, sites answered of sites asked and elapsed time."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

from common.federation_config import FederationConfig
from server.app import run_federation
from server.phase_progress import PhaseProgress, PhaseReporter
from server.shift_monitor import ShiftMonitor
from simulations.progress import RunProgress, phase_text, round_text
from tests.fake_grids import TrainingGrid
from tests.test_shift_monitor import LAYOUT, FakeGrid


def _event(phase: str, answered: int | None, seconds: float | None = None,
           asked: int = 4) -> PhaseProgress:
    return PhaseProgress(3, 5, phase, asked, answered, seconds)


def test_phase_text_says_round_phase_and_sites_answered_of_asked() -> None:
    assert phase_text(_event("train", None)) == "round 3/5 · train · waiting for 4 sites"
    assert phase_text(_event("train", 3, 57.4)) == "round 3/5 · train · 3/4 sites answered in 57 s"
    assert phase_text(_event("shift query", 4, 125.0)) == (
        "round 3/5 · shift query · 4/4 sites answered in 2 min 05 s")
    assert phase_text(PhaseProgress(2, 0, "evaluate", 1)) == (
        "round 2 · evaluate · waiting for 1 site")
    with pytest.raises(ValueError, match="phase must be one of"):
        PhaseProgress(1, 5, "training", 4)


def test_round_text_says_the_outcome() -> None:
    assert round_text({"evaluate": {}, "refused": {}}) == ""
    assert round_text({"evaluate": {"balanced_accuracy": 0.73}, "refused": {"a (train)": "x"},
                       "rejected": {"b": "y"}, "missing": {"train": ["c"]}}) == (
        "DP balanced accuracy 0.730, 2 refused or dropped, 1 without reply")


def test_the_bar_follows_phases_and_rounds_and_its_clock_runs_while_it_waits() -> None:
    out = io.StringIO()
    progress = RunProgress(5, file=out, redraw_seconds=0.05)
    progress.on_phase(_event("train", None))
    assert progress.bar.desc == "round 3/5 · train · waiting for 4 sites"
    drawn = len(out.getvalue())
    time.sleep(0.3)  # no event: the bar is redrawn all the same
    assert len(out.getvalue()) > drawn
    progress.on_phase(_event("train", 4, 12.0))
    progress.on_round({"evaluate": {"balanced_accuracy": 0.8}, "refused": {}})
    assert progress.bar.n == 1
    progress.close()
    last = out.getvalue().rstrip().split("\r")[-1]
    assert last.startswith("round 3/5 · train · 4/4 sites answered in 12 s | 1/5 rounds done | ")
    assert "elapsed, DP balanced accuracy 0.800" in last
    assert not progress._redraw.is_alive()


@pytest.mark.usefixtures("server_identity")
def test_the_server_reports_every_phase_before_and_after_it_waits(tmp_path: Path) -> None:
    cfg = FederationConfig(num_sites=2, prevalences=(0.5, 0.5), num_rounds=3, dp=False,
                           shift=False, min_sites=1, state_dir=str(tmp_path), evaluations=1)
    seen: list[Any] = []
    run_federation(TrainingGrid(silent={2: {3}}), cfg,
                   on_round=lambda entry: seen.append(("end of round", entry["round"])),
                   on_phase=lambda p: seen.append((p.server_round, p.num_rounds, p.phase,
                                                   p.asked, p.answered)))
    assert seen == [
        (1, 3, "train", 2, None), (1, 3, "train", 2, 2), ("end of round", 1),
        (2, 3, "train", 2, None), (2, 3, "train", 2, 1), ("end of round", 2),  # site-3 silent
        (3, 3, "train", 2, None), (3, 3, "train", 2, 2),
        (3, 3, "evaluate", 2, None), (3, 3, "evaluate", 2, 2), ("end of round", 3),
    ]


@pytest.mark.usefixtures("server_identity")
def test_shift_queries_are_phases_too() -> None:
    events: list[PhaseProgress] = []
    monitor = ShiftMonitor(FakeGrid(), LAYOUT, num_classes=2,
                           progress=PhaseReporter(4, events.append))
    monitor.moments_round(1, ArrayRecord())
    monitor.deployment(4, ArrayRecord())
    assert [(e.server_round, e.phase, e.asked, e.answered) for e in events] == [
        (1, "shift query", 3, None), (1, "shift query", 3, 3),
        (4, "calibration query", 3, None), (4, "calibration query", 3, 3),
        (4, "deployment query", 3, None), (4, "deployment query", 3, 3)]
    assert all(e.seconds is not None and e.seconds >= 0 for e in events if e.finished)
