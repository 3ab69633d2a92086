"""Reading a deployed site's images: picture and DICOM trees, MedMNIST files, skipped files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from common.data.datasets import load_image_dataset
from common.data.image_files import (
    UnreadableImage,
    fit_image,
    match_channels,
    read_dicom,
    read_picture,
    window_to_uint8,
)
from common.data.image_folder import SPLIT_FRACTIONS, load_image_tree
from common.data.site_loader import load_site_images
from common.data.splits import POOL, SPLITS, DataFileError
from common.data.tensors import to_model_input
from tests.site_files import random_image, write_class_tree, write_dicom, write_png

SIZE = 16


def _split_tree(root: Path) -> None:
    write_class_tree(root, {"cat": 4, "dog": 3}, seed=1, split="train")
    write_class_tree(root, {"cat": 2, "dog": 1}, seed=2, split="val")
    write_class_tree(root, {"cat": 1, "dog": 2}, seed=3, split="test")


def test_split_layout_reads_every_split_with_sorted_class_labels(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    rng = np.random.default_rng(0)
    write_png(tmp_path / "deploy" / "p0.png", random_image(rng))
    write_png(tmp_path / "deploy" / "ward-3" / "p1.png", random_image(rng))
    tree = load_image_tree(tmp_path, read_picture, channels=1, size=SIZE)
    assert tree.class_names == ("cat", "dog")
    assert {s: len(x) for s, x in tree.splits.images.items()} == {"train": 7, "val": 3, "test": 3,
                                                           POOL: 2}
    assert tree.splits.labels["train"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tree.splits.labels["test"].tolist() == [0, 1, 1]
    assert POOL not in tree.splits.labels  # the pool is unlabelled; subfolder names are no labels
    assert tree.splits.images["train"].shape == (7, SIZE, SIZE)
    assert tree.splits.images["train"].dtype == np.uint8
    assert tree.skipped == ()
    assert tree.min_size == (20, 20) and tree.max_size == (24, 24)


def test_read_pixels_are_the_files_pixels_resized(tmp_path: Path) -> None:
    pixels = np.tile(np.arange(SIZE, dtype=np.uint8) * 16, (SIZE, 1))
    for split in ("train", "val", "test"):
        write_png(tmp_path / split / "a" / "x.png", pixels)
        write_png(tmp_path / split / "b" / "y.png", 255 - pixels)
    site = load_site_images(tmp_path, "imagefolder", 1, SIZE, "s")
    x = site.data.images["train"]
    assert x.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(x[0, 0], torch.from_numpy(pixels).float() / 255)
    assert torch.allclose(x[1, 0], 1 - torch.from_numpy(pixels).float() / 255)
    assert POOL not in site.data.images


def test_channels_three_gives_rgb_for_grey_and_colour_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        write_png(tmp_path / split / "a" / "grey.png", random_image(rng))
        write_png(tmp_path / split / "b" / "rgb.png",
                  rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    site = load_site_images(tmp_path, "imagefolder", 3, SIZE, "s")
    assert site.data.in_channels == 3
    grey = site.data.images["train"][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_grey_from_rgb_matches_pillow() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(match_channels(rgb, 1), expected)
    stack = np.stack([rgb, rgb[::-1]])
    assert np.array_equal(match_channels(stack, 1, stacked=True)[0], expected)
    assert fit_image(rgb, 1, 8).shape == (8, 8)
    assert fit_image(expected, 3, 8).shape == (8, 8, 3)


def test_class_layout_is_split_70_15_15_per_class_deterministically(tmp_path: Path) -> None:
    write_class_tree(tmp_path, {"neg": 20, "pos": 40})
    first = load_image_tree(tmp_path, read_picture, 1, SIZE)
    again = load_image_tree(tmp_path, read_picture, 1, SIZE)
    counts = {s: np.bincount(first.splits.labels[s], minlength=2).tolist()
              for s in SPLIT_FRACTIONS}
    assert counts == {"train": [14, 28], "val": [3, 6], "test": [3, 6]}
    for split in SPLIT_FRACTIONS:
        assert np.array_equal(first.splits.images[split], again.splits.images[split])
    # every file lands in exactly one split
    all_images = np.concatenate([first.splits.images[s] for s in SPLIT_FRACTIONS])
    assert len({img.tobytes() for img in all_images}) == 60


def test_the_split_of_a_class_folder_stays_what_sites_already_have(tmp_path: Path) -> None:
    # Hospitals' files are split by this rule; a change would move them between splits.
    write_class_tree(tmp_path, {"neg": 20})
    tree = load_image_tree(tmp_path, read_picture, 1, SIZE)
    names = {fit_image(read_picture(p), 1, SIZE).tobytes(): p.name
             for p in (tmp_path / "neg").iterdir()}
    held_out = {s: sorted(names[x.tobytes()] for x in tree.splits.images[s])
                for s in ("val", "test")}
    assert held_out == {"val": ["005.png", "013.png", "015.png"],
                        "test": ["002.png", "004.png", "014.png"]}


def test_without_channels_the_tree_keeps_its_own(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = random_image(rng)
    write_png(tmp_path / "a" / "grey.png", grey)
    write_png(tmp_path / "a" / "grey-as-rgb.png", np.repeat(grey[..., None], 3, axis=-1))
    write_png(tmp_path / "deploy" / "p.png", random_image(rng))
    as_read = load_image_tree(tmp_path, read_picture, None, SIZE, pool=False)
    assert as_read.splits.images["train"].shape[1:] == (SIZE, SIZE)  # RGB of equal channels
    assert POOL not in as_read.splits.images
    colour = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    write_png(tmp_path / "b" / "colour.png", colour)
    mixed = load_image_tree(tmp_path, read_picture, None, SIZE)
    assert np.array_equal(mixed.splits.images["train"],
                          load_image_tree(tmp_path, read_picture, 3, SIZE).splits.images["train"])
    assert mixed.splits.images[POOL].shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_simulation_and_a_deployed_site_read_a_folder_alike(tmp_path: Path,
                                                             channels: int) -> None:
    write_class_tree(tmp_path, {"normal": 23, "pneumonia": 17, "covid": 9})
    rng = np.random.default_rng(4)
    if channels == 3:
        write_png(tmp_path / "covid" / "colour.png",
                  rng.integers(0, 256, (31, 27, 3), dtype=np.uint8))
    write_png(tmp_path / "deploy" / "unlabelled.png", random_image(rng))
    (tmp_path / "normal" / "broken.png").write_bytes(b"not a picture")
    simulated = load_image_dataset(str(tmp_path), image_size=SIZE)
    deployed = load_site_images(tmp_path, "imagefolder", channels, SIZE, "s").data
    assert simulated.num_classes == deployed.num_classes == 3
    for split in SPLITS:  # the same files in each split, in the same order, same pixels
        assert torch.equal(to_model_input(simulated.images[split], SIZE),
                           deployed.images[split])
        assert torch.equal(torch.from_numpy(simulated.labels[split]), deployed.labels[split])
    assert all(len(deployed.images[s]) for s in SPLITS)


def test_adding_a_file_moves_few_others_between_splits(tmp_path: Path) -> None:
    write_class_tree(tmp_path, {"neg": 40, "pos": 40})
    before = load_image_tree(tmp_path, read_picture, 1, SIZE)
    write_png(tmp_path / "neg" / "new.png", np.full((20, 24), 7, dtype=np.uint8))
    after = load_image_tree(tmp_path, read_picture, 1, SIZE)
    test_before = {img.tobytes() for img in before.splits.images["test"]}
    test_after = {img.tobytes() for img in after.splits.images["test"]}
    assert len(test_before ^ test_after) <= 2


def test_corrupt_files_are_skipped_and_counted_per_split(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    good = tmp_path / "train" / "cat" / "000.png"
    truncated = tmp_path / "train" / "dog" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "val" / "cat" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "test" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "test" / "dog" / ".DS_Store").write_bytes(b"hidden files are ignored")
    site = load_site_images(tmp_path, "imagefolder", 1, SIZE, "s")
    assert {s: site.skipped_in(s) for s in ("train", "val", "test")} == {
        "train": 1, "val": 1, "test": 1}
    assert {s.path.name for s in site.skipped} == {"truncated.png", "noise.png", "notes.txt"}
    assert all(s.reason for s in site.skipped)
    assert {s: len(x) for s, x in site.data.images.items()} == {"train": 7, "val": 3, "test": 3}


def test_nothing_readable_raises_with_the_root_and_the_reasons(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match=r"no labelled image.*3 files skipped.*x\.png"):
        load_image_tree(tmp_path, read_picture, 1, SIZE)


def test_missing_root_and_empty_root_name_the_path_and_the_layout(tmp_path: Path) -> None:
    missing = re.escape(str(tmp_path / "nope"))
    with pytest.raises(DataFileError, match=rf"{missing} is not a folder.*expected"):
        load_site_images(tmp_path / "nope", "imagefolder", 1, SIZE, "s")
    (tmp_path / "deploy").mkdir()
    with pytest.raises(DataFileError, match=r"no class folders.*<root>/<class>"):
        load_image_tree(tmp_path, read_picture, 1, SIZE)


def test_splits_must_share_their_class_folders(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DataFileError, match=r"test has the class folders \['bird', 'cat', "
                                            r"'dog'\] but .*train has \['cat', 'dog'\]"):
        load_image_tree(tmp_path, read_picture, 1, SIZE)


def test_some_split_folders_but_not_all_is_an_error(tmp_path: Path) -> None:
    write_class_tree(tmp_path, {"a": 2}, split="train")
    write_class_tree(tmp_path, {"a": 2}, split="test")
    with pytest.raises(DataFileError, match="lacks val"):
        load_image_tree(tmp_path, read_picture, 1, SIZE)


def test_sixteen_bit_pictures_are_windowed_to_eight_bits(tmp_path: Path) -> None:
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 500 + 1000)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")
    grey = read_picture(path)
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.ravel().astype(int)) >= 0)


def test_window_of_a_constant_image_is_black() -> None:
    assert not window_to_uint8(np.full((3, 3), 700, dtype=np.uint16)).any()


def test_dicom_grey_is_windowed_min_to_max_and_monochrome1_inverted(tmp_path: Path) -> None:
    raw = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 40 + 200)
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", raw))
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    assert mono2[0, 0] == 0 and mono2[-1, -1] == 255
    assert np.array_equal(mono1, 255 - mono2)
    eight_bit = read_dicom(write_dicom(tmp_path / "u8.dcm", (raw // 40).astype(np.uint8)))
    assert eight_bit[0, 0] == 0 and eight_bit[-1, -1] == 255


def test_dicom_rescale_slope_is_applied(tmp_path: Path) -> None:
    raw = np.arange(100, dtype=np.uint16).reshape(10, 10)
    plain = read_dicom(write_dicom(tmp_path / "a.dcm", raw))
    negated = read_dicom(write_dicom(tmp_path / "b.dcm", raw, slope=-1.0, intercept=1000))
    assert np.array_equal(negated, 255 - plain)


def test_unusable_dicom_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    frames = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(UnreadableImage, match="multi-frame DICOM"):
        read_dicom(frames)
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(UnreadableImage, match="not a readable DICOM file"):
        read_dicom(noise)


def test_bundled_pydicom_ct_file_reads_as_grey() -> None:
    path = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
    if not path.is_file():
        pytest.skip("pydicom's bundled CT_small.dcm is not installed")
    grey = read_dicom(path)
    assert grey.shape == (128, 128) and grey.min() == 0 and grey.max() == 255


def test_dicom_tree_loads_and_skips_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("benign", "malignant"):
            for i in range(2):
                write_dicom(tmp_path / split / label / f"IM{i}",
                            rng.integers(0, 4096, (12, 14), dtype=np.uint16))
    write_dicom(tmp_path / "deploy" / "IM9", rng.integers(0, 4096, (12, 14), dtype=np.uint16))
    (tmp_path / "train" / "benign" / "broken.dcm").write_bytes(b"\0" * 200)
    site = load_site_images(tmp_path, "dicom", 1, SIZE, "s")
    assert site.class_names == ("benign", "malignant")
    assert {s: len(x) for s, x in site.data.images.items()} == {"train": 4, "val": 4, "test": 4,
                                                                POOL: 1}
    assert len(site.skipped) == 1 and site.skipped_in("train") == 1
    assert site.min_size == (12, 14)


def test_medmnist_file_loads_with_the_sites_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(tmp_path / "tiny.npz", **arrays)
    site = load_site_images(tmp_path / "tiny.npz", "medmnist", 3, 32, "m")
    assert site.data.images["train"].shape == (6, 3, 32, 32)
    assert site.data.labels["test"].tolist() == [0, 1, 0]
    assert site.class_names == ("0", "1") and site.skipped == ()
    assert site.min_size == site.max_size == (28, 28)
    with pytest.raises(DataFileError, match=r"missing\.npz"):
        load_site_images(tmp_path / "missing.npz", "medmnist", 1, 32, "m")


def test_loads_are_cached_per_path_format_channels_and_size(tmp_path: Path) -> None:
    _split_tree(tmp_path)
    first = load_site_images(tmp_path, "imagefolder", 1, SIZE, "s")
    assert load_site_images(tmp_path, "imagefolder", 1, SIZE, "s") is first
    assert load_site_images(tmp_path, "imagefolder", 1, SIZE + 8, "s") is not first


def test_unknown_format_and_channels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data format must be one of"):
        load_site_images(tmp_path, "nifti", 1, SIZE, "s")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_site_images(tmp_path, "imagefolder", 2, SIZE, "s")


def test_exif_orientation_is_applied_and_alpha_dropped(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.png"
    Image.fromarray(np.zeros((10, 20, 4), dtype=np.uint8)).save(path, exif=exif)
    assert read_picture(path).shape == (20, 10, 3)


def test_the_site_loader_loads_nothing_meant_for_simulation() -> None:
    probe = ("import sys, common.data.site_loader; print(' '.join(sorted(m for m in sys.modules "
             "if m.startswith(('common.', 'simulations', 'client', 'server')))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert "common.data.site_loader" in loaded
    simulation_only = {"common.data.federation", "common.data.partition",
                       "common.data.datasets", "common.data.fashion_mnist_idx"}
    assert not simulation_only & set(loaded)
    assert not [m for m in loaded if m.startswith(("simulations", "client", "server"))]
