"""The server's shift monitor: what it asks each round and how it centres and accumulates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.norm_moments import MomentLayout
from server.shift_monitor import CENTRING_CLIP_FACTOR, ShiftMonitor

pytestmark = pytest.mark.usefixtures("server_identity")

LAYOUT = MomentLayout(("a", "b", "c"), clip=0.5)
COUNTS = np.array([300.0, 700.0])
BASE = np.zeros((2, 3, 2))
BASE[1] += 0.4
SHIFTED = BASE + np.array([0.3, -0.2])  # every layer's offset up, spread down


class FakeGrid:
    """Three sites answering moment queries with exact, noise-free sums."""

    def __init__(self) -> None:
        self.features = {1: BASE, 2: BASE, 3: SHIFTED}
        self.asked: list[dict] = []

    def get_node_ids(self) -> list[int]:
        return list(self.features)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            config = dict(msg.content["config"])
            self.asked.append(config)
            centre = np.asarray(config["moment-centre"]).reshape(BASE.shape)
            u = self.features[msg.metadata.dst_node_id] - centre
            sums = np.zeros((2, 3, 3))
            sums[:, :, :2] = COUNTS[:, None, None] * u
            sums[:, :, 2] = COUNTS[:, None] * (u**2).sum(axis=2) / config["moment-clip"]
            content = RecordDict({
                "summaries": ArrayRecord({"sums": Array(sums), "counts": Array(COUNTS.copy())}),
                "metrics": MetricRecord({"sum-noise-std": 1e-9, "count-noise-std": 1e-9}),
                "site": ConfigRecord({"name": f"s{msg.metadata.dst_node_id}"}),
            })
            replies.append(Message(content, reply_to=msg))
        return replies


def test_first_round_finds_the_centre_at_a_wide_clip_then_rounds_accumulate() -> None:
    grid = FakeGrid()
    monitor = ShiftMonitor(grid, LAYOUT, num_classes=2)
    arrays = ArrayRecord()
    monitor.moments_round(1, arrays)
    first = grid.asked[:3]
    assert {c["moment-clip"] for c in first} == {LAYOUT.clip * CENTRING_CLIP_FACTOR}
    assert all(np.allclose(c["moment-centre"], 0.0) for c in first)
    # The consensus core is the two sites that agree: their class means become the centre.
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
