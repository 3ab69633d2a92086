"""Finding, loading and partitioning the data, with clear errors for bad input."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest

from common import medmnist_files
from common.image_tensors import to_model_input
from common.medmnist_files import DataFileError, find_medmnist_file, load_medmnist
from common.site_partition import binary_class_probs, partition_by_class_probs


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(medmnist_files.urllib.request, "urlopen", offline)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env, home = tmp_path / "explicit", tmp_path / "env", tmp_path / "home"
    for d in (explicit, env, home / ".medmnist"):
        d.mkdir(parents=True)
        (d / "pneumoniamnist.npz").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FEDSHIFT_DATA_DIR", str(env))
    assert find_medmnist_file("pneumoniamnist", explicit) == explicit / "pneumoniamnist.npz"
    assert find_medmnist_file("pneumoniamnist") == env / "pneumoniamnist.npz"
    monkeypatch.delenv("FEDSHIFT_DATA_DIR")
    assert find_medmnist_file("pneumoniamnist") == home / ".medmnist" / "pneumoniamnist.npz"


def test_missing_file_offline_names_the_file_and_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    with pytest.raises(DataFileError) as err:
        find_medmnist_file("pneumoniamnist")
    message = str(err.value)
    assert "pneumoniamnist.npz not found" in message
    assert str(tmp_path / ".medmnist" / "pneumoniamnist.npz") in message
    assert "FEDSHIFT_DATA_DIR" in message
    assert not (tmp_path / ".medmnist" / "pneumoniamnist.npz").exists()


def test_real_file_loads_with_expected_splits(pneumonia_npz: Path) -> None:
    splits = load_medmnist(pneumonia_npz)
    assert {k: len(v) for k, v in splits.labels.items()} == {"train": 4708, "val": 524,
                                                             "test": 624}
    assert splits.num_classes == 2
    assert int(splits.labels["train"].sum()) == 3494


def test_wrong_image_shape_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    arrays = {f"{s}_{k}": np.zeros((4, 5, 28, 28, 2) if k == "images" else (4, 1), np.uint8)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(path, **arrays)
    with pytest.raises(DataFileError, match=r"train_images has shape \(4, 5, 28, 28, 2\)"):
        load_medmnist(path)
    with pytest.raises(ValueError, match="expected"):
        to_model_input(np.zeros((4, 28), np.uint8), 32)


def test_not_a_medmnist_file(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(DataFileError, match="lacks the arrays"):
        load_medmnist(path)


def test_to_model_input_resizes_into_unit_range() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = to_model_input(images, 64)
    assert x.shape == (3, 1, 64, 64)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_partition_gives_each_site_its_prevalence_disjointly() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 400 + [1] * 900)
    prevalences = [0.2, 0.5, 0.9]
    sites = partition_by_class_probs(labels, binary_class_probs(prevalences), rng)
    sizes = {len(s) for s in sites}
    assert len(sizes) == 1
    for idx, prev in zip(sites, prevalences, strict=True):
        assert labels[idx].mean() == pytest.approx(prev, abs=1 / len(idx))
    combined = np.concatenate(sites)
    assert len(np.unique(combined)) == len(combined)


def test_partition_refuses_an_impossible_size() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    with pytest.raises(ValueError, match="at most"):
        partition_by_class_probs(labels, binary_class_probs([0.5, 0.5]), np.random.default_rng(0),
                                 size=50)
