"""The server checkpoint: written every round, refused for other settings, resumed after a crash."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.atomic_files import load_arrays
from common.federation_config import FederationConfig
from server.app import run_federation
from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from server.run_records import FINAL_ARRAYS_FILE, HISTORY_FILE
from tests.fake_grids import Crash, TrainingGrid


@pytest.fixture
def cfg(tmp_path: Path) -> FederationConfig:
    return FederationConfig(num_sites=2, prevalences=(0.5, 0.5), num_rounds=3, dp=False,
                            shift=False, state_dir=str(tmp_path / "state"))


def _checkpoint(round_: int = 2, fingerprint: str = "abc") -> Checkpoint:
    return Checkpoint(run_key="run-1", fingerprint=fingerprint, server_round=round_,
                      arrays=ArrayRecord({"head.weight": Array(np.arange(6.0).reshape(2, 3))}),
                      strategy={"history": [{"round": 1}]},
                      strategy_arrays={"m/head.weight": np.ones((2, 3))},
                      monitor={"centre": [0.5]})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    assert load_checkpoint(path, "abc") is None
    save_checkpoint(path, _checkpoint())
    back = load_checkpoint(path, "abc")
    assert back is not None
    assert (back.run_key, back.server_round, back.strategy, back.monitor) == (
        "run-1", 2, {"history": [{"round": 1}]}, {"centre": [0.5]})
    np.testing.assert_array_equal(back.arrays["head.weight"].numpy(),
                                  np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(back.strategy_arrays["m/head.weight"], np.ones((2, 3)))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_checkpoint_of_other_settings_or_unreadable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _checkpoint(fingerprint="abc"))
    with pytest.raises(CheckpointError, match="other settings"):
        load_checkpoint(path, "xyz")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path, "abc")


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.9, -1], ids=["half", "tenth", "most", "last-byte"])
def test_a_truncated_checkpoint_is_refused_with_what_to_do(tmp_path: Path, keep: float) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _checkpoint())
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])  # a torn write: the first part only
    with pytest.raises(CheckpointError, match="cannot read the checkpoint") as info:
        load_checkpoint(path, "abc")
    assert "Move it out of the state-dir" in str(info.value)


def test_a_damaged_checkpoint_never_escapes_as_another_error(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _checkpoint())
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    for cut in range(0, len(raw), max(1, len(raw) // 200)):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(path, "abc")
    for position in rng.choice(len(raw), size=300, replace=False):
        damaged = bytearray(raw)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with contextlib.suppress(CheckpointError):  # anything else fails the test
            load_checkpoint(path, "abc")


def test_a_checkpoint_whose_metadata_lacks_a_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    meta = {"version": 1, "run_key": "run-1", "fingerprint": "abc", "server_round": 2}
    np.savez(path, meta=np.array(json.dumps(meta)))
    with pytest.raises(CheckpointError, match=r"cannot read.*KeyError"):
        load_checkpoint(path, "abc")
    np.savez(path, meta=np.array("[1, 2]"))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path, "abc")


def test_fingerprint_ignores_where_the_state_lives_and_the_connect_wait_only() -> None:
    a = FederationConfig(state_dir="/a").to_flower()
    assert config_fingerprint(a) == config_fingerprint(FederationConfig(state_dir="/b").to_flower())
    assert config_fingerprint(a) == config_fingerprint(
        FederationConfig(state_dir="/a", connect_timeout=900.0).to_flower())
    assert config_fingerprint(a) != config_fingerprint(
        FederationConfig(state_dir="/a", lr=0.4).to_flower())


@pytest.mark.usefixtures("server_identity")
def test_a_crashed_run_resumes_from_its_last_round_under_the_same_run_key(
        cfg: FederationConfig) -> None:
    first = TrainingGrid(crash_at_round=3)
    with pytest.raises(Crash):
        run_federation(first, cfg)
    run_key = first.configs[0]["run-key"]
    state = Path(cfg.state_dir)
    saved = load_checkpoint(state / CHECKPOINT_FILE, config_fingerprint(cfg.to_flower()))
    assert saved is not None and saved.server_round == 2 and saved.run_key == run_key
    assert not (state / HISTORY_FILE).exists()

    second = TrainingGrid()
    strategy = run_federation(second, cfg)
    assert {c["server-round"] for c in second.configs} == {3}
    assert {c["run-key"] for c in second.configs} == {run_key}
    assert [e["round"] for e in strategy.history] == [1, 2, 3]
    history = json.loads((state / HISTORY_FILE).read_text())
    assert history["run_key"] == run_key and len(history["rounds"]) == 3
    final = load_arrays(state / FINAL_ARRAYS_FILE)
    name = next(iter(saved.arrays.keys()))
    np.testing.assert_allclose(final[name].numpy(), saved.arrays[name].numpy() + 0.02,
                               atol=1e-6)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("aggregator", ["fedadam", "fedavgm"])
def test_a_resumed_run_with_server_optimiser_state_ends_as_an_uninterrupted_one(
        cfg: FederationConfig, aggregator: str) -> None:
    cfg = cfg.replace(aggregator=aggregator, server_lr=0.1)
    whole = cfg.replace(state_dir=cfg.state_dir + "-whole")
    run_federation(TrainingGrid(), whole)
    with pytest.raises(Crash):
        run_federation(TrainingGrid(crash_at_round=3), cfg)
    saved = load_checkpoint(Path(cfg.state_dir) / CHECKPOINT_FILE,
                            config_fingerprint(cfg.to_flower()))
    assert saved is not None and saved.strategy_arrays  # the moments or the momentum
    run_federation(TrainingGrid(), cfg)
    resumed = load_arrays(Path(cfg.state_dir) / FINAL_ARRAYS_FILE)
    uninterrupted = load_arrays(Path(whole.state_dir) / FINAL_ARRAYS_FILE)
    for name, array in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name].numpy(), array.numpy())


@pytest.mark.usefixtures("server_identity")
def test_a_checkpoint_with_state_of_another_format_is_refused_with_what_to_do(
        cfg: FederationConfig) -> None:
    cfg = cfg.replace(aggregator="fedadam")
    with pytest.raises(Crash):
        run_federation(TrainingGrid(crash_at_round=3), cfg)
    path = Path(cfg.state_dir) / CHECKPOINT_FILE
    saved = load_checkpoint(path, config_fingerprint(cfg.to_flower()))
    assert saved is not None
    saved.strategy_arrays = {"m/head.weight": np.zeros(3)}  # as fedshift wrote FedAdam's before
    save_checkpoint(path, saved)
    with pytest.raises(CheckpointError, match=r"aggregator state.*Move it out of the state-dir"):
        run_federation(TrainingGrid(), cfg)


@pytest.mark.usefixtures("server_identity")
def test_a_finished_run_is_not_resumed_a_new_one_starts(cfg: FederationConfig) -> None:
    first = TrainingGrid()
    run_federation(first, cfg)
    second = TrainingGrid()
    run_federation(second, cfg)
    assert {c["server-round"] for c in second.configs} == {1, 2, 3}
    assert second.configs[0]["run-key"] != first.configs[0]["run-key"]


@pytest.mark.usefixtures("server_identity")
def test_a_checkpoint_from_other_settings_stops_the_run(cfg: FederationConfig) -> None:
    with pytest.raises(Crash):
        run_federation(TrainingGrid(crash_at_round=2), cfg)
    with pytest.raises(CheckpointError, match="other settings"):
        run_federation(TrainingGrid(), cfg.replace(lr=0.1))


@pytest.mark.usefixtures("server_identity")
def test_a_crash_after_the_last_round_finishes_the_records_without_training(
        cfg: FederationConfig) -> None:
    first = TrainingGrid()
    run_federation(first, cfg)
    state = Path(cfg.state_dir)
    path = state / CHECKPOINT_FILE
    saved = load_checkpoint(path, config_fingerprint(cfg.to_flower()))
    assert saved is not None and saved.finished and saved.server_round == cfg.num_rounds
    saved.finished = False  # as if the server died before writing its final records
    save_checkpoint(path, saved)
    (state / HISTORY_FILE).unlink()
    second = TrainingGrid()
    run_federation(second, cfg)
    assert second.configs == []
    history = json.loads((state / HISTORY_FILE).read_text())
    assert history["run_key"] == saved.run_key and len(history["rounds"]) == cfg.num_rounds
