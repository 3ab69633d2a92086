"""The server's shift monitor: what it asks each round and how it centres and accumulates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

from common.label_shift import num_bins
from common.messages import SHIFT_QUERY_TYPE, DeploymentReply, MomentsReply, ValidationReply
from common.norm_moments import MomentLayout
from common.shift_estimators import ESTIMATORS, SharedCalibration
from server.shift_monitor import CENTRING_CLIP_FACTOR, ShiftMonitor

pytestmark = pytest.mark.usefixtures("server_identity")

LAYOUT = MomentLayout(("a", "b", "c"), clip=0.5)
COUNTS = np.array([300.0, 700.0])
BASE = np.zeros((2, 3, 2))
BASE[1] += 0.4
SHIFTED = BASE + np.array([0.3, -0.2])  # every layer's offset up, spread down
BINS = num_bins(2)
VAL_HIST = np.array([[0, 0, 10, 60, 20, 10, 0, 0], [0, 0, 5, 10, 25, 60, 0, 0]], dtype=float)


class FakeGrid:
    """Three sites answering moment queries with exact, noise-free sums."""

    def __init__(self) -> None:
        self.features = {1: BASE, 2: BASE, 3: SHIFTED}
        self.val_hists = {node: VAL_HIST for node in self.features}
        self.asked: list[dict] = []

    def get_node_ids(self) -> list[int]:
        return list(self.features)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == SHIFT_QUERY_TYPE
            config = dict(msg.content["config"])
            self.asked.append(config)
            node = msg.metadata.dst_node_id
            if config["kind"] == "validation":
                reply = ValidationReply(val_hist=self.val_hists[node], val_noise_std=1.0,
                                        site=f"s{node}")
                replies.append(Message(reply.to_content(), reply_to=msg))
                continue
            if config["kind"] == "deployment":
                # The pool holds the validation images (100 of each class), released exactly.
                shared = SharedCalibration.from_values(config["calibration"], 2)
                stats = {name: e.statistic(VAL_HIST.sum(axis=0), shared)
                         for name, e in ESTIMATORS.items()}
                reply = DeploymentReply(site=f"s{node}", releases=stats,
                                        noise_stds={name: 1.0 for name in stats},
                                        extras={"corrected.auroc": 0.9})
                replies.append(Message(reply.to_content(), reply_to=msg))
                continue
            centre = np.asarray(config["moment-centre"]).reshape(BASE.shape)
            u = self.features[node] - centre
            sums = np.zeros((2, 3, 3))
            sums[:, :, :2] = COUNTS[:, None, None] * u
            sums[:, :, 2] = COUNTS[:, None] * (u**2).sum(axis=2) / config["moment-clip"]
            reply = MomentsReply(sums=sums, counts=COUNTS.copy(), sum_noise_std=1e-9,
                                 count_noise_std=1e-9, site=f"s{node}")
            replies.append(Message(reply.to_content(), reply_to=msg))
        return replies


def test_first_round_finds_the_centre_at_a_wide_clip_then_rounds_accumulate() -> None:
    grid = FakeGrid()
    monitor = ShiftMonitor(grid, LAYOUT, num_classes=2)
    arrays = ArrayRecord()
    monitor.moments_round(1, arrays)
    first = grid.asked[:3]
    assert {c["moment-clip"] for c in first} == {LAYOUT.clip * CENTRING_CLIP_FACTOR}
    assert all(np.allclose(c["moment-centre"], 0.0) for c in first)
    # The centre is the median of the sites' class means: the two that agree.
    np.testing.assert_allclose(monitor.centre, BASE, atol=1e-9)

    monitor.moments_round(2, arrays)
    second = grid.asked[3:]
    assert {c["moment-clip"] for c in second} == {LAYOUT.clip}
    assert all(np.allclose(c["moment-centre"], BASE.ravel()) for c in second)
    sites = monitor.rounds[1]["sites"]
    assert sites["s3"]["covariate_flagged"]
    assert sites["s3"]["covariate_score"] == pytest.approx((0.3**2 + 0.2**2) / 2, rel=1e-6)
    assert not sites["s1"]["covariate_flagged"] and not sites["s2"]["covariate_flagged"]
    assert [r["clip"] for r in monitor.rounds] == [LAYOUT.clip * CENTRING_CLIP_FACTOR, LAYOUT.clip]
    np.testing.assert_allclose(monitor.training_priors()["s1"], COUNTS / COUNTS.sum())


def test_deployment_sends_the_federations_calibration_and_reads_the_estimates() -> None:
    grid = FakeGrid()
    monitor = ShiftMonitor(grid, LAYOUT, num_classes=2, run_key="run-7")
    monitor.moments_round(1, ArrayRecord())
    final = monitor.deployment(1, ArrayRecord())
    assert {c["run-key"] for c in grid.asked} == {"run-7"}
    assert [c["kind"] for c in grid.asked[3:]] == ["validation"] * 3 + ["deployment"] * 3
    assert set(grid.asked[3]) == {"kind", "server-round", "run-key"}
    # The calibration sent is the federation's, fitted to the pooled validation histograms.
    calibration = final["federation_calibration"]
    assert calibration["converged"] and calibration["slope"] > 0
    sent = SharedCalibration.from_values(grid.asked[-1]["calibration"], 2)
    assert (sent.slope, sent.bias) == (calibration["slope"], calibration["bias"])
    site = final["sites"]["s1"]
    assert site["metrics"] == {"corrected": {"auroc": 0.9}}
    assert "concept_gap" in site
    # Every pool holds the validation images of both classes (100 each), released
    # without noise: both estimators find 0.5 and their intervals hold it.
    for key in ("deployment_prior", "deployment_prior_mlls", "deployment_prior_bbse"):
        assert site[key] == pytest.approx([0.5, 0.5], abs=1e-4)
        low, high = site[f"{key}_interval"]
        assert low[1] <= 0.5 <= high[1] and 0 <= low[1] < high[1] <= 1
    assert site["deployment_prior"] == site["deployment_prior_mlls"]
    assert final["federation_calibration"]["converged"]
    # Identical pools: nothing a prior change cannot explain.
    assert site["output_shift_flagged"] is False and site["output_shift_distance"] < 1e-12
    assert monitor.refused == {}


def test_a_failed_calibration_is_recorded_and_falls_back_to_the_identity(
        caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid()
    one_class = VAL_HIST * np.array([[1.0], [0.0]])  # no class-1 validation image anywhere
    grid.val_hists = {node: one_class for node in grid.val_hists}
    monitor = ShiftMonitor(grid, LAYOUT, num_classes=2)
    final = monitor.deployment(1, ArrayRecord())
    assert final["federation_calibration"] == {"slope": 1.0, "bias": 0.0, "converged": False}
    assert "calibration fit from the validation histograms failed" in caplog.text


def test_without_a_run_key_none_is_sent() -> None:
    grid = FakeGrid()
    ShiftMonitor(grid, LAYOUT, num_classes=2).moments_round(1, ArrayRecord())
    assert all("run-key" not in c for c in grid.asked)
