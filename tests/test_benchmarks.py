"""The benchmarks run end to end on a slice of real X-rays and report sane figures.

Speed is reported by the benchmarks, never asserted here: these tests check the
structure of the figures and that they make sense (positive rates and times,
memory measured, finite overheads, bn+head sending under 2 % of the model).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from simulations.benchmarks import dp_throughput, round_overhead, site_scaling
from simulations.benchmarks.round_overhead import PHASES, best_schedule, phase_figures

TINY_SIMULATION = ["--image-size", "16", "--batch-size", "32", "--rounds", "1"]


@pytest.fixture
def bench_data_dir(small_pneumonia_dir: Path) -> Path:
    return small_pneumonia_dir


def _last_json_line(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_phase_figures_compare_the_server_wall_time_with_the_sites_compute() -> None:
    entry = {
        "seconds": {"train": 10.0, "evaluate": 2.0},
        "sites": {
            "site-0": {"train": {"compute-seconds": 4.0}, "evaluate": {"compute-seconds": 0.5}},
            "site-1": {"train": {"compute-seconds": 6.0}, "evaluate": {"compute-seconds": 1.5}},
            "site-2": {"train": {"train-loss": 0.3}},  # no time reported: left out
        },
    }
    train = phase_figures(entry, "train", slots=1)
    assert (train.sites, train.sum_site_s, train.max_site_s) == (2, 10.0, 6.0)
    assert train.overhead_s == pytest.approx(4.0)
    assert train.overhead_beyond_slots_s == pytest.approx(0.0)  # one at a time: 4 + 6
    assert train.wall_over_sum == pytest.approx(1.0)
    assert phase_figures(entry, "train", slots=2).overhead_beyond_slots_s == pytest.approx(4.0)
    evaluate = phase_figures(entry, "evaluate")
    assert evaluate.overhead_s == pytest.approx(0.5)
    assert evaluate.wall_over_sum == pytest.approx(1.0)
    assert math.isnan(phase_figures({"sites": {}, "seconds": {}}, "train").wall_over_sum)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bn+head", "head"])
def test_dp_throughput_reports_rates_memory_and_bytes(
        bench_data_dir: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    figures = dp_throughput.main(["--data-dir", str(bench_data_dir), "--epochs", "1",
                                  "--image-size", "16", "--batch-size", "32", "--mode", mode])
    assert _last_json_line(capsys) == figures
    assert figures["mode"] == mode
    assert figures["torch_threads"] >= 1
    for setting in ("dp", "nondp"):
        assert figures[f"{setting}_images_per_s"] > 0
        assert figures[f"{setting}_peak_memory_mib"] > 0
        assert 0 <= figures[f"{setting}_memory_increase_mib"] <= figures[
            f"{setting}_peak_memory_mib"]
    assert math.isfinite(figures["ratio"]) and figures["ratio"] > 0
    assert 0 < figures["bytes_per_round_per_site"] < 0.02 * figures["full_model_bytes"]
    assert figures["memory_method"]


@pytest.mark.slow
def test_round_overhead_reports_each_phase_of_each_round(
        bench_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = round_overhead.main(["--data-dir", str(bench_data_dir), "--sites", "2",
                                   *TINY_SIMULATION])
    assert _last_json_line(capsys) == figures
    assert (figures["sites"], figures["rounds"], figures["dp"]) == (2, 1, True)
    assert [r["round"] for r in figures["per_round"]] == [1]
    for phase in PHASES:
        f = figures["per_round"][0][phase]
        assert f["sites"] == 2
        assert f["wall_s"] > 0 and f["max_site_s"] > 0
        assert f["sum_site_s"] >= f["max_site_s"]
        assert math.isfinite(f["overhead_s"]) and math.isfinite(f["overhead_beyond_slots_s"])
        assert f["overhead_beyond_slots_s"] <= f["overhead_s"]
        assert math.isfinite(f["wall_over_sum"]) and f["wall_over_sum"] > 0
        assert math.isfinite(figures["mean_overhead_s"][phase])
        assert f["max_site_s"] <= f["best_schedule_s"] <= f["sum_site_s"]
        cost = figures["message_fixed_cost_s"][phase]
        assert cost["warm_s"] > 0 and cost["cold_s"] > 0
    assert 1 <= figures["sites_at_a_time"] <= 2
    assert figures["simulate_wall_s"] > 0
    assert 0 < figures["bytes_fraction"] < 0.02


@pytest.mark.slow
def test_site_scaling_reports_time_and_memory_per_site_count(
        bench_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = site_scaling.main(["--data-dir", str(bench_data_dir), "--sites", "2",
                                 *TINY_SIMULATION])
    assert _last_json_line(capsys) == figures
    (row,) = figures["rows"]
    assert row["sites"] == 2
    assert row["train_images_per_site"] > 0
    for key in ("simulate_wall_s", "server_train_s_per_round", "server_evaluate_s_per_round",
                "site_train_s_total", "site_evaluate_s_total", "peak_memory_mib"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["simulate_wall_s"] >= row["server_train_s_per_round"]
    assert math.isfinite(row["overhead_beyond_slots_s_per_round"])
    assert figures["memory_method"]


def test_best_schedule_is_the_shortest_whole_site_schedule() -> None:
    def brute_force(times: list[float], slots: int) -> float:
        return min(max(sum(t for t, w in zip(times, assignment, strict=True) if w == k)
                       for k in range(slots))
                   for assignment in itertools.product(range(slots), repeat=len(times)))

    rng = random.Random(4)
    assert best_schedule([14.0, 14.0, 14.0], 2) == 28.0  # not the lower bound 21
    assert best_schedule([], 2) == 0.0 and best_schedule([3.0], 4) == 3.0
    for _ in range(30):
        times = [round(rng.uniform(0.5, 9.0), 2) for _ in range(rng.randint(2, 7))]
        slots = rng.randint(1, 3)
        exact = brute_force(times, slots)
        assert exact - 1e-9 <= best_schedule(times, slots) <= exact * 1.001 + 1e-9
