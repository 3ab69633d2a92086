"""Read an ImageFolder-style tree of pictures or DICOM files: the one reader of such trees.

Simulation (:func:`common.data.datasets.load_image_dataset` given a folder) and a
deployed site (:func:`common.data.site_loader.load_site_images`) both read trees here,
so a folder gives the same splits and the same pixels under ``fedshift simulate``
and ``fedshift site run``.

Two layouts are understood (``S`` a split: ``train``, ``val``, ``test``):

``<root>/<S>/<class>/<files>``
    The site's own split: all three split folders, each with the same class
    folders (an empty folder is fine: it keeps the class's label index).
``<root>/<class>/<files>``
    No split folders: every class's files are split 70/15/15 into train, val and
    test, deterministically (ordered by a fixed hash of their path relative to
    the root, so adding files moves few others between splits). The split is a
    property of the folder: no run setting changes it.

Either layout may hold ``<root>/deploy/``: the unlabelled deployment pool
(split ``"pool"``), its files directly inside or in subfolders whose names are
ignored. Class names are the sorted folder names; class ``i`` is the ``i``-th.

Files are found recursively below a class (or ``deploy``) folder; names starting
with a dot are ignored and symbolic links to folders are not followed. A file
that cannot be decoded is skipped and recorded with its reason, never fatal.
Every image is resized to the run's square size by
:func:`common.data.image_files.fit_image`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.image_files import ImageReader, UnreadableImage, fit_image, match_channels
from common.data.splits import POOL, SPLITS, DataFileError, ImageSplits

logger = logging.getLogger(__name__)

DEPLOY_FOLDER = "deploy"
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
# Salt of the hash that orders a class's files before the split. Sites' splits
# depend on it: changing it moves files between train, val and test.
_SPLIT_SALT = "0:"
# (file, label) per split; label -1 in the unlabelled pool
Listing = dict[str, list[tuple[Path, int]]]
LAYOUT_HELP = (
    "expected <root>/<class>/<images>, or <root>/train|val|test/<class>/<images>, "
    "with an optional unlabelled <root>/deploy/"
)


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not used, the split it belonged to and why."""

    path: Path
    split: str
    reason: str


@dataclass(frozen=True)
class TreeImages:
    """The images of a tree at one size, and what was skipped.

    ``splits`` holds uint8 ``(N, S, S)`` (grey) or ``(N, S, S, 3)`` (RGB) images per
    split, ``"pool"`` included when it was read, and int64 ``(N,)`` labels per
    labelled split (not the pool). ``min_size`` and ``max_size`` are the smallest
    and largest height and width, ``(H, W)``, of the images read, before resizing.
    """

    splits: ImageSplits
    class_names: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]
    min_size: tuple[int, int]
    max_size: tuple[int, int]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _files_below(folder: Path) -> list[Path]:
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(d)]
        found.extend(Path(current) / f for f in files if _visible(f))
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in _subfolders(folder) if p.name != DEPLOY_FOLDER}


def _hash_rank(relative: Path) -> bytes:
    return hashlib.blake2b(f"{_SPLIT_SALT}{relative.as_posix()}".encode(),
                           digest_size=8).digest()


def _split_counts(n: int) -> dict[str, int]:
    val = int(n * SPLIT_FRACTIONS["val"] + 0.5)
    test = int(n * SPLIT_FRACTIONS["test"] + 0.5)
    return {"train": n - val - test, "val": val, "test": test}


def _percentages() -> str:
    return "/".join(f"{100 * SPLIT_FRACTIONS[s]:g}" for s in SPLITS)


def _auto_split(root: Path, classes: dict[str, Path]) -> Listing:
    """Split every class's files into train/val/test by hash order."""
    out: Listing = {s: [] for s in SPLITS}
    for label, folder in enumerate(classes.values()):
        files = sorted(_files_below(folder), key=lambda p: _hash_rank(p.relative_to(root)))
        start = 0
        for split, count in _split_counts(len(files)).items():
            out[split].extend((p, label) for p in files[start:start + count])
            start += count
    return out


def _listed_splits(root: Path) -> tuple[tuple[str, ...], Listing]:
    """Class names and ``(file, label)`` per split, for either layout."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        classes = _class_folders(root)
        if not classes:
            raise DataFileError(f"{root} has no class folders; {LAYOUT_HELP}")
        return tuple(classes), _auto_split(root, classes)
    missing = [s for s in SPLITS if s not in present]
    if missing:
        raise DataFileError(
            f"{root} has the split folders {', '.join(present)} but lacks "
            f"{', '.join(missing)}; give all of train, val and test, or none (then fedshift "
            f"splits <root>/<class>/ folders {_percentages()})"
        )
    per_split = {s: _class_folders(root / s) for s in SPLITS}
    names = tuple(per_split["train"])
    if not names:
        raise DataFileError(f"{root / 'train'} has no class folders; {LAYOUT_HELP}")
    for split in SPLITS:
        if tuple(per_split[split]) != names:
            raise DataFileError(
                f"{root / split} has the class folders {list(per_split[split])} but "
                f"{root / 'train'} has {list(names)}; every split needs the same class "
                "folders (an empty folder is fine), since class i is the i-th sorted name"
            )
    listed = {
        s: [(p, label) for label, name in enumerate(names)
            for p in _files_below(per_split[s][name])]
        for s in SPLITS
    }
    return names, listed


def _is_colour(pixels: np.ndarray) -> bool:
    """Whether ``pixels`` are RGB with channels that differ somewhere."""
    return pixels.ndim == 3 and not (
        np.array_equal(pixels[..., 0], pixels[..., 1])
        and np.array_equal(pixels[..., 1], pixels[..., 2])
    )


def load_image_tree(root: Path, read: ImageReader, channels: int | None, size: int,
                    pool: bool = True) -> TreeImages:
    """Read every image of the tree at ``root`` (see the module docstring for layouts).

    Parameters
    ----------
    root : Path
        The tree's root folder.
    read : ImageReader
        Decodes one file into ``(H, W)`` or ``(H, W, 3)`` uint8 pixels, raising
        :class:`common.data.image_files.UnreadableImage` for a file it cannot use
        (:func:`common.data.image_files.read_picture` or
        :func:`~common.data.image_files.read_dicom`).
    channels : int | None
        1 (grey) or 3 (RGB): every image is converted to this. None: the tree's
        own, RGB when at least one image has differing channels, else grey (grey
        images of an RGB tree get their grey value in all three channels).
    size : int
        Every image is resized to ``size`` x ``size``.
    pool : bool (default: True)
        Whether to read the unlabelled ``deploy`` folder, when there is one.

    Returns
    -------
    TreeImages
        The images per split, their labels, the class names and the skipped files.

    Raises
    ------
    DataFileError
        When ``root`` is not a folder, the layout is not one of the two above, or
        not one labelled image can be read (the message names the root and gives
        the first reasons).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(f"{root} is not a folder; {LAYOUT_HELP}")
    class_names, listed = _listed_splits(root)
    if pool and (root / DEPLOY_FOLDER).is_dir():
        listed[POOL] = [(p, -1) for p in _files_below(root / DEPLOY_FOLDER)]
    pixels: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    skipped: list[SkippedFile] = []
    heights: list[int] = []
    widths: list[int] = []
    for split, files in listed.items():
        pixels[split], kept = [], []
        for path, label in files:
            try:
                raw = read(path)
            except UnreadableImage as exc:
                skipped.append(SkippedFile(path, split, str(exc)))
                continue
            except Exception as exc:  # decoders of arbitrary files raise anything
                skipped.append(SkippedFile(path, split, f"{type(exc).__name__}: {exc}"))
                continue
            heights.append(raw.shape[0])
            widths.append(raw.shape[1])
            own = channels or (3 if _is_colour(raw) else 1)
            pixels[split].append(fit_image(raw, own, size))
            kept.append(label)
        if split != POOL:
            labels[split] = np.asarray(kept, dtype=np.int64)
    if not any(len(labels[s]) for s in SPLITS):
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise DataFileError(
            f"no labelled image in {root} could be read ({len(skipped)} files skipped"
            f"{': ' + reasons if reasons else ''}); {LAYOUT_HELP}"
        )
    if skipped:
        logger.warning("%s: skipped %d unreadable files, e.g. %s: %s", root, len(skipped),
                       skipped[0].path, skipped[0].reason)
    if channels is None:
        channels = 3 if any(x.ndim == 3 for xs in pixels.values() for x in xs) else 1
    empty_shape = (0, size, size) if channels == 1 else (0, size, size, 3)
    images = {
        split: np.stack([match_channels(x, channels) for x in xs]) if xs
        else np.empty(empty_shape, dtype=np.uint8)
        for split, xs in pixels.items()
    }
    return TreeImages(
        splits=ImageSplits(images=images, labels=labels, num_classes=len(class_names),
                           source=root),
        class_names=class_names, skipped=tuple(skipped),
        min_size=(min(heights), min(widths)), max_size=(max(heights), max(widths)),
    )
