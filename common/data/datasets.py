"""One entry point for the labelled image data sets a simulation can split across sites.

:func:`load_image_dataset` chooses the kind of data set from its name:

``fashion-mnist``
    Fashion-MNIST from its four idx files, read by
    :func:`common.data.fashion_mnist_idx.load_fashion_mnist` (where they are looked for,
    and its seeded validation split, are described there).
a path ending in ``.npz``
    A file in MedMNIST layout (``train_images``, ``train_labels``, ``val_...``,
    ``test_...``). A relative path that does not exist from the working directory
    is looked up in ``data_dir``.
a folder
    An ImageFolder tree of pictures: ``DIR/<class>/<images>`` (every class split
    70/15/15 into train/val/test by a fixed hash of the file paths, the same for
    every seed) or ``DIR/{train,val,test}/<class>/<images>``, read by
    :func:`common.data.image_folder.load_image_tree`, the reader a deployed site uses,
    so the same folder gives the same splits and pixels there. Class ``i`` is the
    ``i``-th sorted class folder name; a ``deploy`` folder is ignored. Files that
    cannot be decoded are skipped (and logged). Every image is resized to
    ``image_size`` x ``image_size``. The data set is colour, ``(N, S, S, 3)``, when
    at least one image has differing RGB channels, else grey, ``(N, S, S)``; grey
    images of a colour set get the grey value in all three channels.
any other name
    A MedMNIST flag (``pneumoniamnist``, ``bloodmnist``, ...): ``<flag>_<size>.npz`` at a
    size MedMNIST+ publishes (64, 128, 224), else ``<flag>.npz`` (28 px), is looked up
    (downloaded when missing; PneumoniaMNIST's 28 px file ships with the package) by
    :func:`common.data.medmnist_npz.find_medmnist_file`.

A name counts as a path when it ends in ``.npz``, contains a path separator, starts
with ``~`` or ``.``, or names an existing folder and is not a MedMNIST flag.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.data.fashion_mnist_idx import FASHION_MNIST, load_fashion_mnist
from common.data.image_files import read_picture
from common.data.image_folder import load_image_tree
from common.data.medmnist_npz import (
    BASE_SIDE,
    find_medmnist_file,
    is_shipped,
    load_medmnist,
    native_file_advice,
)
from common.data.splits import DataFileError, ImageSplits

logger = logging.getLogger(__name__)

def _medmnist_flags() -> set[str]:
    try:
        from medmnist.info import INFO
    except ImportError:
        return set()
    return set(INFO)


def _load_folder(root: Path, image_size: int) -> ImageSplits:
    """The labelled splits of an ImageFolder tree of pictures, read by
    :func:`common.data.image_folder.load_image_tree` as a deployed site reads it (its
    ``deploy`` folder left out), at ``image_size`` px with the tree's own channels.

    Raises
    ------
    DataFileError
        When the layout is not understood or no image can be read.
    """
    tree = load_image_tree(root, read_picture, None, image_size, pool=False)
    splits = tree.splits
    logger.info("%s: %d images, classes %s; %s, %dx%d to %dx%d px resized to %d px",
                root, sum(len(x) for x in splits.images.values()),
                dict(enumerate(tree.class_names)),
                "colour" if dataset_channels(splits) == 3 else "grey",
                *tree.min_size, *tree.max_size, image_size)
    return splits


def _load_npz(path: Path, data_dir: str | Path | None) -> ImageSplits:
    if not path.is_file() and not path.is_absolute() and data_dir:
        beside = Path(data_dir).expanduser() / path
        if beside.is_file():
            path = beside
    if not path.is_file():
        where = f" (nor in {data_dir})" if data_dir and not path.is_absolute() else ""
        raise DataFileError(
            f"{path} does not exist{where}; give the path of a .npz file in MedMNIST "
            "layout (train_images, train_labels, val_images, val_labels, test_images, "
            "test_labels)"
        )
    return load_medmnist(path)


def _is_path(name: str, flags: set[str]) -> bool:
    if name.lower().endswith(".npz") or name.startswith(("~", ".")):
        return True
    if os.sep in name or "/" in name or (os.altsep and os.altsep in name):
        return True
    return name not in flags and Path(name).is_dir()


def load_image_dataset(name: str, data_dir: str | None = None, seed: int = 0,
                       image_size: int = BASE_SIDE) -> ImageSplits:
    """Load the labelled train/val/test images of the data set ``name``.

    Parameters
    ----------
    name : str
        ``fashion-mnist``, a path to a MedMNIST-layout ``.npz`` file, an ImageFolder
        directory, or a MedMNIST flag (see the module docstring for how the kind is
        chosen and where files are looked up).
    data_dir : str | None (default: None)
        Directory searched first for MedMNIST and Fashion-MNIST files, and for a
        relative ``.npz`` path not found from the working directory.
    seed : int (default: 0)
        Seed of the validation split of Fashion-MNIST; MedMNIST files and image
        folders keep their own splits.
    image_size : int (default: 28)
        Side the images will be resized to: an image folder is read at this size, a
        MedMNIST flag reads its native file at a size MedMNIST+ publishes.

    Returns
    -------
    ImageSplits
        uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` images and int64 labels per split;
        ``source`` is the file or directory read.

    Raises
    ------
    DataFileError
        When the data cannot be found or read; the message says what to do.
    """
    name = name.strip()
    if not name:
        raise DataFileError(
            "no data set named; give a MedMNIST flag (e.g. pneumoniamnist), fashion-mnist, "
            "the path of a MedMNIST-layout .npz file or of an image folder"
        )
    if name.lower().replace("_", "-") == FASHION_MNIST:
        return load_fashion_mnist(data_dir, seed)
    flags = _medmnist_flags()
    if _is_path(name, flags):
        path = Path(name).expanduser()
        if path.is_dir():
            return _load_folder(path, image_size)
        if path.suffix.lower() == ".npz":
            return _load_npz(path, data_dir)
        raise DataFileError(
            f"{path} is neither an image folder nor a .npz file; give an existing folder "
            "(<dir>/<class>/<images> or <dir>/train|val|test/<class>/<images>) or a "
            "MedMNIST-layout .npz file"
        )
    try:
        path = find_medmnist_file(name, data_dir, image_size=image_size)
    except DataFileError as exc:
        if name in flags:
            raise
        raise DataFileError(
            f"{exc}. Other kinds of data set: {FASHION_MNIST}, the path of a MedMNIST-layout "
            ".npz file, or an image folder (<dir>/<class>/<images> or "
            "<dir>/train|val|test/<class>/<images>)"
        ) from exc
    return load_medmnist(path)


def describe_source(splits: ImageSplits, name: str, image_size: int,
                    data_dir: str | None = None) -> str:
    """One line for people about the data set ``name`` as loaded in ``splits``: the file
    or folder read, whether it is the shipped copy, its image size, how it is resized,
    and where a native-resolution MedMNIST file would go."""
    height, width = splits.images["train"].shape[1:3]
    notes = ["shipped copy"] if is_shipped(splits.source) else []
    notes.append(f"{height} px" if height == width else f"{height}x{width} px")
    if (height, width) != (image_size, image_size):
        resized = "upsampled" if max(height, width) < image_size else "resized"
        notes.append(f"{resized} to {image_size} px")
    line = f"{splits.source} ({', '.join(notes)})"
    if name in _medmnist_flags():
        advice = native_file_advice(name, height, image_size, data_dir)
        if advice is not None:
            line += f"; {advice}"
    return line


def dataset_channels(splits: ImageSplits) -> int:
    """Channels of the images of ``splits``: 1 (grey) or 3 (colour).

    Raises
    ------
    DataFileError
        When the splits disagree (grey in one, colour in another).
    """
    per_split = {s: 3 if x.ndim == 4 and x.shape[-1] == 3 else 1
                 for s, x in splits.images.items()}
    channels = set(per_split.values())
    if len(channels) != 1:
        raise DataFileError(
            f"{splits.source}: the splits mix grey and colour images ({per_split} channels); "
            "store every split with the same channels"
        )
    return channels.pop()
