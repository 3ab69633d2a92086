"""Shared fixtures: the real PneumoniaMNIST file from ../shared and small slices of it."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest

from common.data import medmnist_npz
from tests.site_files import write_medmnist_slice

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing downloads in tests: every MedMNIST download fails as it does offline."""
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("tests do not download")

    monkeypatch.setattr(medmnist_npz.urllib.request, "urlopen", offline)


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    """The real PneumoniaMNIST file; required in CI, skipped elsewhere when absent."""
    if not SHARED_NPZ.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_NPZ} is missing: CI must have ../shared beside the checkout")
        pytest.skip(f"{SHARED_NPZ} not present")
    return SHARED_NPZ


@pytest.fixture(scope="session")
def small_pneumonia_dir(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Path:
    """A directory holding pneumoniamnist.npz cut to a random slice of every split."""
    out = tmp_path_factory.mktemp("small-data")
    write_medmnist_slice(pneumonia_npz, out / "pneumoniamnist.npz",
                         {"train": 480, "val": 80, "test": 160}, seed=0)
    return out


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tests build server-side Messages outside a running ServerApp.

    Flower stamps each new Message with the identity of the task that creates it,
    which a ServerApp process has and a test process lacks.
    """
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
