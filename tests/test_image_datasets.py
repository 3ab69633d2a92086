"""Every kind of data set a simulation reads, and label-skewed splits of multi-class ones."""

from __future__ import annotations

import gzip
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import fashion_mnist_idx
from common.data.datasets import dataset_channels, load_image_dataset
from common.data.fashion_mnist_idx import (
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_idx,
)
from common.data.federation import (
    class_frequencies,
    dirichlet_class_mixes,
    load_federation,
)
from common.data.image_files import fit_image
from common.data.partition import binary_class_probs, partition_by_class_probs
from common.data.splits import SPLITS, DataFileError, SiteData
from common.federation_config import ConfigError, FederationConfig
from tests.site_files import random_image, write_png

REPO = Path(__file__).resolve().parents[1]
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 16


# --- helpers -------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    """An idx file of ``array`` (uint8) with ``magic``, gzip-compressed unless told."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def tagged_images(n: int, size: int = SIZE, colour: bool = False) -> np.ndarray:
    """``n`` random images whose first two pixels spell their index (see :func:`tags`)."""
    shape = (n, size, size, 3) if colour else (n, size, size)
    images = np.random.default_rng(n).integers(0, 256, shape, dtype=np.uint8)
    ids = np.arange(n)
    images[:, 0, 0, ...] = (ids % 256)[:, None] if colour else ids % 256
    images[:, 0, 1, ...] = (ids // 256)[:, None] if colour else ids // 256
    return images


def tags(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The indices spelled by :func:`tagged_images`, from uint8 arrays or [0, 1] tensors."""
    if isinstance(images, torch.Tensor):
        pixels = np.rint(images[:, 0].numpy() * 255).astype(np.int64)
    else:
        pixels = images[..., 0] if images.ndim == 4 else images
        pixels = pixels.astype(np.int64)
    return pixels[:, 0, 0] + 256 * pixels[:, 0, 1]


def labels_for(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts).astype(np.int64)


def write_npz(path: Path, class_counts: dict[str, list[int]], colour: bool = False) -> Path:
    """A MedMNIST-layout file; every split has ``class_counts[split][c]`` images of class c."""
    arrays = {}
    for split in SPLITS:
        labels = np.random.default_rng(1).permutation(labels_for(class_counts[split]))
        arrays[f"{split}_images"] = tagged_images(len(labels), colour=colour)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_fashion(directory: Path, train_per_class: int = 20, test_per_class: int = 5
                  ) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST idx files with 10 classes of tagged 28x28 images."""
    out = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.random.default_rng(2).permutation(labels_for([per_class] * 10))
        images = tagged_images(len(labels), size=28)
        write_idx(directory / f"{FASHION_MNIST_FILES[f'{split}_images']}.gz", images,
                  IDX_IMAGES_MAGIC)
        write_idx(directory / f"{FASHION_MNIST_FILES[f'{split}_labels']}.gz", labels,
                  IDX_LABELS_MAGIC)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def site_tags(site: SiteData, split: str) -> np.ndarray:
    return tags(site.images[split])


def cfg_for(path: Path, **changes: object) -> FederationConfig:
    settings: dict[str, object] = {"dataset": str(path), "image_size": SIZE, "num_classes": 3,
                                   "num_sites": 3}
    settings.update(changes)
    return FederationConfig(**settings)


THREE_CLASSES = {"train": [600, 600, 600], "val": [150, 150, 150], "test": [150, 150, 150]}


# --- idx files and Fashion-MNIST -----------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trip(tmp_path: Path, compress: bool) -> None:
    images = tagged_images(7, size=5)
    labels = np.arange(7, dtype=np.uint8)
    read_images = read_idx(write_idx(tmp_path / "i", images, IDX_IMAGES_MAGIC, compress))
    read_labels = read_idx(write_idx(tmp_path / "l", labels, IDX_LABELS_MAGIC, compress),
                           IDX_LABELS_MAGIC)
    assert read_images.shape == (7, 5, 5) and read_images.dtype == np.uint8
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)


def test_idx_reader_refuses_wrong_magic_truncation_and_damage(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "labels.gz", np.zeros(4, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DataFileError, match="magic number 2049, expected 2051"):
        read_idx(labels, IDX_IMAGES_MAGIC)
    other = write_idx(tmp_path / "other.gz", np.zeros(4, np.uint8), 2050)
    with pytest.raises(DataFileError, match="magic number 2050"):
        read_idx(other)
    full = gzip.decompress(write_idx(tmp_path / "x.gz", np.zeros((3, 4, 4), np.uint8),
                                     IDX_IMAGES_MAGIC).read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(full[:-5]))
    with pytest.raises(DataFileError, match=r"header announces dimensions \(3, 4, 4\)"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(full)[:20])
    with pytest.raises(DataFileError, match="cannot read the idx file"):
        read_idx(tmp_path / "broken.gz")


def test_fashion_mnist_from_data_dir_has_a_stratified_seeded_validation_split(
    tmp_path: Path,
) -> None:
    written = write_fashion(tmp_path)
    splits = load_image_dataset("fashion-mnist", str(tmp_path), seed=3)
    assert splits.source == tmp_path
    assert splits.num_classes == 10 and dataset_channels(splits) == 1
    assert {s: len(v) for s, v in splits.labels.items()} == {"train": 180, "val": 20,
                                                             "test": 50}
    assert np.bincount(splits.labels["val"]).tolist() == [2] * 10
    assert np.bincount(splits.labels["train"]).tolist() == [18] * 10
    train_ids, val_ids = tags(splits.images["train"]), tags(splits.images["val"])
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(200))
    # images keep their own labels
    assert np.array_equal(written["train_labels"][val_ids], splits.labels["val"])
    assert np.array_equal(tags(splits.images["test"]), np.arange(50))
    again = load_image_dataset("fashion-mnist", str(tmp_path), seed=3)
    assert np.array_equal(tags(again.images["val"]), val_ids)
    other = load_image_dataset("fashion-mnist", str(tmp_path), seed=4)
    assert not np.array_equal(tags(other.images["val"]), val_ids)


def test_fashion_mnist_lookup_env_then_error_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fashion(tmp_path / "env" / "fashion-mnist", train_per_class=3, test_per_class=1)
    monkeypatch.setenv("FEDSHIFT_DATA_DIR", str(tmp_path / "env"))
    assert load_image_dataset("fashion-mnist").source == tmp_path / "env" / "fashion-mnist"
    monkeypatch.delenv("FEDSHIFT_DATA_DIR")
    monkeypatch.setattr(fashion_mnist_idx, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataFileError, match="apt-get install dataset-fashion-mnist"):
        load_image_dataset("fashion-mnist", str(tmp_path / "empty"))


def test_fashion_mnist_images_and_labels_must_agree(tmp_path: Path) -> None:
    write_fashion(tmp_path, train_per_class=3, test_per_class=1)
    write_idx(tmp_path / f"{FASHION_MNIST_FILES['test_labels']}.gz",
              np.zeros(4, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DataFileError, match="test files hold 10 images but 4 labels"):
        load_image_dataset("fashion-mnist", str(tmp_path))


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    splits = load_image_dataset("fashion-mnist")
    counts = {s: len(v) for s, v in splits.labels.items()}
    assert counts["train"] + counts["val"] == 60000 and counts["test"] == 10000
    assert counts["val"] == 6000
    assert splits.num_classes == 10 and dataset_channels(splits) == 1
    assert splits.images["train"].shape[1:] == (28, 28)
    assert all(np.bincount(v).tolist() == [len(v) // 10] * 10 for v in splits.labels.values())


# --- npz files and MedMNIST flags ------------------------------------------------------


def test_npz_by_path_and_beside_data_dir(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_npz(tmp_path / "data" / "mine.npz",
                     {"train": [4, 5], "val": [2, 2], "test": [3, 1]}, colour=True)
    splits = load_image_dataset(str(path))
    assert splits.source == path and dataset_channels(splits) == 3
    assert splits.images["train"].shape == (9, SIZE, SIZE, 3)
    monkeypatch.chdir(tmp_path)
    assert load_image_dataset("mine.npz", str(tmp_path / "data")).source == path
    with pytest.raises(DataFileError, match=r"missing\.npz does not exist.*MedMNIST layout"):
        load_image_dataset(str(tmp_path / "missing.npz"))


def test_medmnist_flag_is_looked_up_in_data_dir(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "bloodmnist.npz",
                     {"train": [3] * 8, "val": [1] * 8, "test": [1] * 8}, colour=True)
    splits = load_image_dataset("bloodmnist", str(tmp_path))
    assert splits.source == path and splits.num_classes == 8 and dataset_channels(splits) == 3


def test_unknown_name_lists_the_kinds_of_data_set(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FEDSHIFT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileError, match=r"not a MedMNIST dataset.*fashion-mnist"):
        load_image_dataset("no-such-set")
    with pytest.raises(DataFileError, match=r"neither an image folder nor a \.npz file"):
        load_image_dataset("./no-such-folder")


# --- image folders ------------------------------------------------------------------------


def test_flat_folder_is_split_70_15_15_per_class_at_the_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("zebra", "ant", "mole"):
        for i in range(20):
            height, width = (30, 30) if i < 2 else (20, 24)
            write_png(tmp_path / "tree" / name / f"{i:02d}.png", random_image(rng, height, width))
    grey_as_rgb = np.repeat(random_image(rng, 20, 24)[..., None], 3, axis=-1)
    write_png(tmp_path / "tree" / "ant" / "rgb-but-grey.png", grey_as_rgb)
    (tmp_path / "tree" / "ant" / "notes.txt").write_text("not an image")
    splits = load_image_dataset(str(tmp_path / "tree"), seed=1, image_size=SIZE)
    assert splits.source == tmp_path / "tree" and splits.num_classes == 3
    assert dataset_channels(splits) == 1
    counts = {s: np.bincount(v, minlength=3).tolist() for s, v in splits.labels.items()}
    # ant (label 0) has 22 files, split 16 / 3 / 3; notes.txt, in val, is skipped
    assert counts == {"train": [16, 14, 14], "val": [2, 3, 3], "test": [3, 3, 3]}
    for split in SPLITS:
        assert splits.images[split].shape[1:] == (SIZE, SIZE)
        assert splits.images[split].dtype == np.uint8
    rows = {s: {x.tobytes() for x in splits.images[s]} for s in SPLITS}
    assert not (rows["train"] & rows["val"] or rows["train"] & rows["test"]
                or rows["val"] & rows["test"])
    # the split is the folder's own, as at a deployed site: no seed moves it
    other_seed = load_image_dataset(str(tmp_path / "tree"), seed=2, image_size=SIZE)
    assert all(np.array_equal(other_seed.images[s], splits.images[s]) for s in SPLITS)


def test_split_folder_tree_in_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        for name in ("b", "a"):
            for i in range(count):
                write_png(tmp_path / split / name / f"{i}.png",
                          rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    grey = random_image(rng, 12, 10)
    write_png(tmp_path / "test" / "b" / "grey.png", grey)
    splits = load_image_dataset(str(tmp_path), image_size=SIZE)
    assert dataset_channels(splits) == 3 and splits.num_classes == 2
    assert {s: len(v) for s, v in splits.labels.items()} == {"train": 8, "val": 4, "test": 3}
    assert splits.labels["train"].tolist() == [0] * 4 + [1] * 4
    assert splits.images["test"].shape == (3, SIZE, SIZE, 3)
    last = splits.images["test"][-1]  # b/grey.png sorts after b/0.png
    assert np.array_equal(last, fit_image(grey, 3, SIZE))


def test_partial_split_folders_name_the_70_15_15_split(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "x.png", random_image(np.random.default_rng(0)))
    with pytest.raises(DataFileError, match=r"lacks val, test.* folders 70/15/15"):
        load_image_dataset(str(tmp_path))


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("text")
    with pytest.raises(DataFileError, match=r"no labelled image in .* could be read"):
        load_image_dataset(str(tmp_path))


# --- site splits ----------------------------------------------------------------------------


def test_dirichlet_mixes_are_seeded_and_follow_alpha() -> None:
    freqs = np.array([0.5, 0.3, 0.2, 0.0])
    first = dirichlet_class_mixes(freqs, 1.0, 5, np.random.default_rng(7))
    assert np.array_equal(first, dirichlet_class_mixes(freqs, 1.0, 5, np.random.default_rng(7)))
    assert not np.array_equal(first, dirichlet_class_mixes(freqs, 1.0, 5,
                                                           np.random.default_rng(8)))
    assert np.allclose(first.sum(axis=1), 1.0) and np.all(first[:, 3] == 0)
    flat = dirichlet_class_mixes(freqs, 1e5, 5, np.random.default_rng(0))
    assert np.allclose(flat, freqs, atol=0.01)
    skewed = dirichlet_class_mixes(freqs, 0.01, 50, np.random.default_rng(0))
    assert np.median(skewed.max(axis=1)) > 0.95


def test_label_skew_sites_follow_their_draw_deterministically_and_disjointly(
    tmp_path: Path,
) -> None:
    path = write_npz(tmp_path / "three.npz", THREE_CLASSES)
    cfg = cfg_for(path, label_skew=2.0, seed=11)
    sites = load_federation.__wrapped__(cfg)
    assert np.array_equal(
        np.concatenate([site_tags(s, "train") for s in sites]),
        np.concatenate([site_tags(s, "train") for s in load_federation.__wrapped__(cfg)]))
    mixes = dirichlet_class_mixes(np.full(3, 1 / 3), 2.0, 3, np.random.default_rng(11))
    for split in SPLITS:
        ids = np.concatenate([site_tags(s, split) for s in sites])
        assert len(np.unique(ids)) == len(ids)
        assert len({len(s.labels[split]) for s in sites}) == 1
        for site, mix in zip(sites, mixes, strict=True):
            got = class_frequencies(site.labels[split].numpy(), 3)
            assert np.allclose(got, mix, atol=1.5 / len(site.labels[split]))
    assert len(sites[0].labels["train"]) >= 10
    other = load_federation.__wrapped__(cfg.replace(seed=12))
    assert not np.array_equal(other[0].labels["train"].numpy(),
                              sites[0].labels["train"].numpy())


def test_multi_class_default_gives_every_site_the_data_sets_mix(tmp_path: Path) -> None:
    counts = {"train": [100, 200, 300], "val": [20, 40, 60], "test": [30, 60, 90]}
    path = write_npz(tmp_path / "uneven.npz", counts)
    sites = load_federation.__wrapped__(cfg_for(path, num_sites=4))
    for split in SPLITS:
        wanted = np.array(counts[split]) / sum(counts[split])
        for site in sites:
            got = class_frequencies(site.labels[split].numpy(), 3)
            assert np.allclose(got, wanted, atol=1.5 / len(site.labels[split]))
        ids = np.concatenate([site_tags(s, split) for s in sites])
        assert len(np.unique(ids)) == len(ids)
        assert len(ids) >= 0.75 * sum(counts[split])  # most of the split is used


def test_fashion_mnist_federation_through_data_dir(tmp_path: Path) -> None:
    write_fashion(tmp_path, train_per_class=44, test_per_class=5)  # 40 + 4 per class
    cfg = FederationConfig(dataset="fashion-mnist", data_dir=str(tmp_path), num_classes=10,
                           image_size=28, num_sites=2)
    sites = load_federation(cfg)
    assert [s.in_channels for s in sites] == [1, 1]
    assert all(np.bincount(s.labels["train"].numpy()).tolist() == [19] * 10 for s in sites)


def test_data_set_must_match_num_classes_and_in_channels(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "three.npz", THREE_CLASSES)
    with pytest.raises(ConfigError, match=r"three.npz has 3 classes but num-classes is 2; "
                                          r"set num-classes = 3"):
        load_federation(cfg_for(path, num_classes=2, num_sites=4))
    with pytest.raises(ConfigError, match=r"has grey images \(1 channel\) but in-channels is 3; "
                                          r"set in-channels = 1"):
        load_federation(cfg_for(path, in_channels=3))


def test_too_skewed_for_the_pool_names_label_skew(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "small.npz",
                     {"train": [20, 20, 20], "val": [10, 10, 10], "test": [10, 10, 10]})
    with pytest.raises(ConfigError, match=r"label-skew = 0.05.*raise label-skew.*num-sites"):
        load_federation(cfg_for(path, label_skew=0.05, num_sites=8))


def test_binary_prevalence_split_is_unchanged(tmp_path: Path) -> None:
    counts = {"train": [150, 250], "val": [30, 40], "test": [40, 50]}
    path = write_npz(tmp_path / "binary.npz", counts)
    cfg = cfg_for(path, num_classes=2, num_sites=2, prevalences=(0.3, 0.7), seed=5)
    sites = load_federation(cfg)
    with np.load(path) as data:
        labels = {s: data[f"{s}_labels"].reshape(-1).astype(np.int64) for s in SPLITS}
    rng = np.random.default_rng(5)  # the partition's only use of randomness, as before
    for split in SPLITS:
        expected = partition_by_class_probs(labels[split], binary_class_probs([0.3, 0.7]), rng)
        for site, idx in zip(sites, expected, strict=True):
            assert np.array_equal(site_tags(site, split), idx)  # tags are the row indices
            assert np.array_equal(site.labels[split].numpy(), labels[split][idx])


def test_binary_prevalences_that_cannot_be_served_keep_their_message(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "rare.npz",
                     {"train": [50, 1], "val": [10, 10], "test": [10, 10]})
    with pytest.raises(ConfigError, match=r"cannot split rare.npz into 2 sites with "
                                          r"prevalences \[0.3, 0.7\]: cannot give"):
        load_federation(cfg_for(path, num_classes=2, num_sites=2, prevalences=(0.3, 0.7)))


# --- the setting ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
def test_label_skew_must_be_finite_and_not_negative(value: float) -> None:
    with pytest.raises(ConfigError, match="label-skew must be a finite number >= 0"):
        FederationConfig(label_skew=value)


def test_label_skew_round_trips_and_is_in_the_app_config() -> None:
    cfg = FederationConfig(label_skew=0.3)
    assert FederationConfig.from_flower(cfg.to_flower()).label_skew == 0.3
    assert FederationConfig.from_flower({"label-skew": "0.5"}).label_skew == 0.5
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"]["label-skew"] == 0.0
    assert FederationConfig.from_flower(app["config"]).label_skew == 0.0
