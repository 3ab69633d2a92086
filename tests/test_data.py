"""Finding, loading and partitioning the data, with clear errors for bad input.

Every download fails in tests (``tests/conftest.py``), as it does offline.
"""

from __future__ import annotations

import json
import logging
import tomllib
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from common.data import medmnist_npz
from common.data.datasets import describe_source, load_image_dataset
from common.data.medmnist_npz import (
    SHIPPED_DIR,
    find_medmnist_file,
    load_medmnist,
)
from common.data.partition import (
    PoolTooSmall,
    binary_class_probs,
    class_counts,
    draw_disjoint,
    partition_by_class_probs,
)
from common.data.splits import DataFileError
from common.data.tensors import to_model_input

REPO = Path(__file__).resolve().parents[1]
SHIPPED = SHIPPED_DIR / "pneumoniamnist.npz"


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The search directories in order (explicit, environment, MedMNIST's), all empty."""
    dirs = {"explicit": tmp_path / "explicit", "env": tmp_path / "env",
            "home": tmp_path / "home" / ".medmnist"}
    for d in dirs.values():
        d.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDSHIFT_DATA_DIR", str(dirs["env"]))
    return dirs


def write_medmnist(path: Path, side: int, per_split: int = 6) -> Path:
    """A small MedMNIST-layout file of grey ``side`` x ``side`` images, two classes."""
    rng = np.random.default_rng(side)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (per_split, side, side), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(per_split) % 2).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


def test_lookup_order_then_the_shipped_copy(places: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for d in places.values():
        (d / "pneumoniamnist.npz").write_bytes(b"x")
    explicit, env, home = places["explicit"], places["env"], places["home"]
    assert find_medmnist_file("pneumoniamnist", explicit) == explicit / "pneumoniamnist.npz"
    assert find_medmnist_file("pneumoniamnist") == env / "pneumoniamnist.npz"
    monkeypatch.delenv("FEDSHIFT_DATA_DIR")
    assert find_medmnist_file("pneumoniamnist") == home / "pneumoniamnist.npz"
    (home / "pneumoniamnist.npz").unlink()
    assert find_medmnist_file("pneumoniamnist") == SHIPPED
    assert find_medmnist_file("pneumoniamnist", download=False) == SHIPPED


def test_the_native_file_comes_first_wherever_it_is(places: dict[str, Path]) -> None:
    (places["explicit"] / "pneumoniamnist.npz").write_bytes(b"x")
    (places["home"] / "pneumoniamnist_64.npz").write_bytes(b"x")
    (places["env"] / "pneumoniamnist_128.npz").write_bytes(b"x")
    explicit = places["explicit"]
    assert find_medmnist_file("pneumoniamnist", explicit, image_size=64) == \
        places["home"] / "pneumoniamnist_64.npz"
    assert find_medmnist_file("pneumoniamnist", explicit, image_size=128) == \
        places["env"] / "pneumoniamnist_128.npz"
    # MedMNIST+ publishes no 32 or 224 px file here: the 28 px one is read.
    for size in (32, 224):
        assert find_medmnist_file("pneumoniamnist", explicit, image_size=size) == \
            explicit / "pneumoniamnist.npz"


def test_a_native_download_comes_before_a_28px_file_and_lands_in_the_first_place(
        places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[tuple[str, Path]] = []

    def serve(url: str, md5: str | None, target: Path) -> None:
        fetched.append((url, target))
        target.write_bytes(b"x")

    monkeypatch.setattr(medmnist_npz, "_download", serve)
    (places["home"] / "pneumoniamnist.npz").write_bytes(b"x")
    found = find_medmnist_file("pneumoniamnist", places["explicit"], image_size=64)
    assert found == places["explicit"] / "pneumoniamnist_64.npz" and found.is_file()
    assert [url.split("?")[0].rsplit("/", 1)[1] for url, _ in fetched] == \
        ["pneumoniamnist_64.npz"]


def test_offline_the_28px_file_is_upsampled_and_the_log_says_where_the_native_one_goes(
        places: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    path = write_medmnist(places["env"] / "pneumoniamnist.npz", side=28)
    with caplog.at_level(logging.INFO, logger="common.data.medmnist_npz"):
        splits = load_image_dataset("pneumoniamnist", str(places["explicit"]), image_size=64)
    assert splits.source == path
    messages = [r.getMessage() for r in caplog.records]
    assert any("pneumoniamnist_64.npz not found" in m and "tests do not download" in m
               for m in messages)
    advice = f"place pneumoniamnist_64.npz in {places['explicit']} for native resolution"
    assert f"using 28 px pneumoniamnist.npz upsampled to 64 px; {advice}" in messages
    assert describe_source(splits, "pneumoniamnist", 64, str(places["explicit"])) == \
        f"{path} (28 px, upsampled to 64 px); {advice}"


def test_a_native_file_is_read_as_it_is(places: dict[str, Path]) -> None:
    path = write_medmnist(places["home"] / "pneumoniamnist_64.npz", side=64)
    write_medmnist(places["env"] / "pneumoniamnist.npz", side=28)
    splits = load_image_dataset("pneumoniamnist", image_size=64)
    assert splits.source == path and splits.images["train"].shape[1:] == (64, 64)
    assert describe_source(splits, "pneumoniamnist", 64) == f"{path} (64 px)"


def test_with_nothing_anywhere_and_no_network_the_shipped_copy_is_read(
        places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSHIFT_DATA_DIR")
    splits = load_image_dataset("pneumoniamnist", image_size=64)
    assert splits.source == SHIPPED
    assert {k: len(v) for k, v in splits.labels.items()} == {"train": 4708, "val": 524,
                                                             "test": 624}
    assert int(splits.labels["train"].sum()) == 3494
    assert describe_source(splits, "pneumoniamnist", 64) == (
        f"{SHIPPED} (shipped copy, 28 px, upsampled to 64 px); place pneumoniamnist_64.npz "
        f"in {places['home']} for native resolution")
    assert list(places["home"].iterdir()) == []  # the failed downloads left nothing


def test_the_shipped_copy_is_the_real_file_and_is_packaged(pneumonia_npz: Path) -> None:
    assert SHIPPED.read_bytes() == pneumonia_npz.read_bytes()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["common"]
    assert "data_files/pneumoniamnist.npz" in package_data
    assert all((REPO / "common" / name).is_file() for name in package_data)
    licence = (SHIPPED_DIR / "README.md").read_text()
    assert "CC BY 4.0" in licence and "Scientific Data" in licence and "Kermany" in licence


def test_code_without_data_files_finds_the_installed_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flwr run`` imports the app's copy of the code, which carries no ``.npz``."""
    checkout = tmp_path / "checkout"
    data_files = checkout / "common" / "data_files"
    data_files.mkdir(parents=True)
    write_medmnist(data_files / "pneumoniamnist.npz", side=28)

    class EditableInstall:
        def locate_file(self, path: str) -> Path:
            return tmp_path / "site-packages" / path

        def read_text(self, name: str) -> str | None:
            url = checkout.as_uri()
            return json.dumps({"dir_info": {"editable": True}, "url": url}) \
                if name == "direct_url.json" else None

    monkeypatch.setattr(medmnist_npz, "SHIPPED_DIR", tmp_path / "app" / "data_files")
    monkeypatch.setattr(medmnist_npz.metadata, "distribution", lambda name: EditableInstall())
    assert medmnist_npz.shipped_file("pneumoniamnist") == data_files / "pneumoniamnist.npz"
    assert medmnist_npz.shipped_file("bloodmnist") is None


def test_missing_file_offline_names_the_file_and_where_to_put_it(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSHIFT_DATA_DIR")
    urls: list[str] = []

    def offline(url: str, timeout: float) -> None:
        urls.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(medmnist_npz.urllib.request, "urlopen", offline)
    with pytest.raises(DataFileError) as err:
        find_medmnist_file("bloodmnist", image_size=64)
    message = str(err.value)
    assert "bloodmnist.npz not found" in message
    assert str(places["home"] / "bloodmnist.npz") in message
    assert "FEDSHIFT_DATA_DIR" in message
    assert list(places["home"].iterdir()) == []
    # The network is down: after the native file's download no other is tried.
    assert [u.split("?")[0].rsplit("/", 1)[1] for u in urls] == ["bloodmnist_64.npz"]


def test_a_bad_native_download_does_not_stop_the_28px_one(
        places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def serve(url: str, md5: str | None, target: Path) -> None:
        if "_64" in url:
            raise DataFileError(f"download of {url} has the wrong checksum; try again")
        target.write_bytes(b"x")

    monkeypatch.setattr(medmnist_npz, "_download", serve)
    assert find_medmnist_file("bloodmnist", image_size=64) == places["env"] / "bloodmnist.npz"


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


@pytest.mark.parametrize(("size", "probs", "expected"), [
    (10, [0.33, 0.33, 0.34], [3, 3, 4]),  # the largest remainder rounds up
    (1, [0.4, 0.2, 0.4], [0, 0, 1]),  # never the smallest quota; ties: the higher class
    (5, [0.5, 0.5], [2, 3]),  # two classes: class 1 rounded half up
    (75, [0.82, 0.18], [61, 14]),  # a tie, though 75 * 0.82 is 61.49999999999999 in floats
    (7, [0.0, 1.0], [0, 7]),
    (0, [0.3, 0.7], [0, 0]),
])
def test_class_counts_fill_the_size_and_round_each_quota(size: int, probs: list[float],
                                                         expected: list[int]) -> None:
    assert class_counts(size, np.array(probs)).tolist() == expected


def test_class_counts_of_two_classes_round_class_one_half_up() -> None:
    for prevalence in np.linspace(0, 1, 201):
        for size in range(0, 400, 7):
            counts = class_counts(size, binary_class_probs([prevalence])[0])
            assert counts.sum() == size
            assert counts[1] == np.floor(size * prevalence + 0.5)


def test_draw_disjoint_gives_every_part_its_counts_and_no_example_twice() -> None:
    labels = np.random.default_rng(3).integers(0, 3, 500)
    counts = np.array([[10, 0, 5], [3, 30, 7], [0, 0, 0], [20, 20, 20]])
    parts = draw_disjoint(labels, counts, np.random.default_rng(0))
    for part, row in zip(parts, counts, strict=True):
        assert np.bincount(labels[part], minlength=3).tolist() == row.tolist()
    combined = np.concatenate(parts)
    assert len(np.unique(combined)) == len(combined) == counts.sum()


def test_draw_disjoint_names_the_class_the_pool_lacks() -> None:
    labels = np.array([0] * 10 + [1] * 4)
    with pytest.raises(PoolTooSmall, match="need 5 examples of class 1 but the pool has 4") as err:
        draw_disjoint(labels, np.array([[2, 3], [2, 2]]), np.random.default_rng(0))
    assert (err.value.label, err.value.needed, err.value.available) == (1, 5, 4)


def test_partition_gives_every_site_the_class_counts_of_its_mix() -> None:
    labels = np.random.default_rng(1).integers(0, 4, 3000)
    mixes = np.random.default_rng(2).dirichlet(np.ones(4), size=3)
    sites = partition_by_class_probs(labels, mixes, np.random.default_rng(0), size=250)
    for idx, mix in zip(sites, mixes, strict=True):
        assert np.bincount(labels[idx], minlength=4).tolist() == class_counts(250, mix).tolist()
