"""One entry point for the labelled image data sets a simulation can split across sites.

:func:`load_image_dataset` chooses the kind of data set from its name:

``fashion-mnist``
    Fashion-MNIST from its four idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
    gzip-compressed or not), as the Debian package ``dataset-fashion-mnist`` installs
    them. Looked for in ``data_dir`` (or ``data_dir/fashion-mnist``), then
    ``$FEDSHIFT_DATA_DIR/fashion-mnist``, then ``/usr/share/datasets/fashion-mnist``.
    It has a train and a test split only: a seeded, class-stratified 10 % of train
    becomes the validation split.
a path ending in ``.npz``
    A file in MedMNIST layout (``train_images``, ``train_labels``, ``val_...``,
    ``test_...``). A relative path that does not exist from the working directory
    is looked up in ``data_dir``.
a folder
    An ImageFolder tree of pictures: ``DIR/<class>/<images>`` (every class split
    70/15/15 into train/val/test by a fixed hash of the file paths, the same for
    every seed) or ``DIR/{train,val,test}/<class>/<images>``, read by
    :func:`common.image_folder.load_image_tree`, the reader a deployed site uses,
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
    :func:`common.medmnist_files.find_medmnist_file`.

A name counts as a path when it ends in ``.npz``, contains a path separator, starts
with ``~`` or ``.``, or names an existing folder and is not a MedMNIST flag.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from common.data_splits import DataFileError, ImageSplits
from common.image_files import read_picture
from common.image_folder import load_image_tree
from common.medmnist_files import (
    BASE_SIDE,
    DATA_DIR_ENV,
    find_medmnist_file,
    is_shipped,
    load_medmnist,
    native_file_advice,
)

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_VAL_FRACTION = 0.1
IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


def _medmnist_flags() -> set[str]:
    try:
        from medmnist.info import INFO
    except ImportError:
        return set()
    return set(INFO)


def read_idx(path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file of unsigned bytes (MNIST's format), gzip-compressed or plain.

    Parameters
    ----------
    path : Path
        The file.
    expected_magic : int | None (default: None)
        :data:`IDX_IMAGES_MAGIC` (2051, ``(N, H, W)`` images) or :data:`IDX_LABELS_MAGIC`
        (2049, ``(N,)`` labels); None accepts either.

    Returns
    -------
    np.ndarray
        uint8 array with the dimensions the header gives.

    Raises
    ------
    DataFileError
        When the file cannot be read or decompressed, its magic number is not the
        expected one, or its size does not match the dimensions in its header.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            compressed = fh.read(2) == _GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as fh:
            data = bytearray(fh.read())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(f"cannot read the idx file {path} ({exc}); download it again") \
            from exc
    allowed = (expected_magic,) if expected_magic else (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC)
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic not in allowed:
        wanted = " or ".join(str(m) for m in allowed)
        raise DataFileError(
            f"{path} has the magic number {magic}, expected {wanted} (an idx file of "
            f"unsigned-byte {'images' if allowed == (IDX_IMAGES_MAGIC,) else 'data'}); "
            "is it the right file, and complete?"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataFileError(
            f"{path} holds {len(data) - header} data bytes but its header announces "
            f"dimensions {dims} ({expected} bytes); the file is damaged or truncated, "
            "download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into kept and held-out ones, ``fraction`` of every class held out.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels.
    fraction : float
        Share of each class held out (rounded half up per class).
    seed : int
        Seed of the choice; the same seed gives the same split.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The kept and the held-out indices, each sorted ascending; together all of
        ``range(N)``, disjoint.
    """
    rng = np.random.default_rng(seed)
    held = [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = int(np.floor(fraction * len(members) + 0.5))
        held.append(rng.permutation(members)[:count])
    held_out = np.sort(np.concatenate(held))
    keep = np.ones(len(labels), dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist_dir(data_dir: str | Path | None = None) -> Path:
    """The first directory that holds all four Fashion-MNIST idx files.

    Parameters
    ----------
    data_dir : str | Path | None (default: None)
        Searched first, then its ``fashion-mnist`` subfolder; then
        ``$FEDSHIFT_DATA_DIR/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist``.

    Raises
    ------
    DataFileError
        When none holds them; the message says how to install them.
    """
    dirs = []
    if data_dir:
        dirs += [Path(data_dir).expanduser(), Path(data_dir).expanduser() / FASHION_MNIST]
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]).expanduser() / FASHION_MNIST)
    dirs.append(SYSTEM_FASHION_MNIST_DIR)
    for directory in dirs:
        if all(_idx_file(directory, stem) for stem in FASHION_MNIST_FILES.values()):
            return directory
    names = ", ".join(f"{stem}.gz" for stem in FASHION_MNIST_FILES.values())
    raise DataFileError(
        f"Fashion-MNIST not found (searched {', '.join(str(d) for d in dirs)}). Install it "
        f"with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put {names} in "
        f"one directory and pass it as --data-dir or set ${DATA_DIR_ENV} to its parent "
        f"(the files then lie in ${DATA_DIR_ENV}/{FASHION_MNIST})"
    )


def load_fashion_mnist(data_dir: str | Path | None = None, seed: int = 0) -> ImageSplits:
    """Fashion-MNIST as grey ``(N, 28, 28)`` images in 10 classes.

    Parameters
    ----------
    data_dir : str | Path | None (default: None)
        Where to look first, see :func:`find_fashion_mnist_dir`.
    seed : int (default: 0)
        Seed of the validation split: a class-stratified 10 % of the train file.

    Raises
    ------
    DataFileError
        When the files are missing or damaged, or images and labels disagree.
    """
    directory = find_fashion_mnist_dir(data_dir)
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        path = _idx_file(directory, stem)
        if path is None:  # removed since the lookup
            raise DataFileError(f"{directory / stem}.gz disappeared while being read")
        arrays[key] = read_idx(path, magic)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataFileError(
                f"{directory}: the {split} files hold {len(images)} images but "
                f"{len(labels)} labels; one of them is from another data set or damaged"
            )
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataFileError(
                f"{directory}: {split} labels go up to {int(labels.max())}, but "
                f"Fashion-MNIST has {len(FASHION_MNIST_CLASSES)} classes; wrong files?"
            )
    train_labels = arrays["train_labels"].astype(np.int64)
    kept, held = stratified_holdout(train_labels, FASHION_MNIST_VAL_FRACTION, seed)
    logger.info("Fashion-MNIST from %s: classes %s; %d of %d training images held out for "
                "validation (seed %d)", directory, dict(enumerate(FASHION_MNIST_CLASSES)),
                len(held), len(train_labels), seed)
    return ImageSplits(
        images={"train": arrays["train_images"][kept], "val": arrays["train_images"][held],
                "test": arrays["test_images"]},
        labels={"train": train_labels[kept], "val": train_labels[held],
                "test": arrays["test_labels"].astype(np.int64)},
        num_classes=len(FASHION_MNIST_CLASSES), source=directory,
    )


def _load_folder(root: Path, image_size: int) -> ImageSplits:
    """The labelled splits of an ImageFolder tree of pictures, read by
    :func:`common.image_folder.load_image_tree` as a deployed site reads it (its
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
