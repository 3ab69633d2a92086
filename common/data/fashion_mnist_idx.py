"""Fashion-MNIST from its four idx files, as the Debian package ``dataset-fashion-mnist``
installs them.

The files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzip-compressed or not)
are looked for in a data directory (or its ``fashion-mnist`` folder), then
``$FEDSHIFT_DATA_DIR/fashion-mnist``, then ``/usr/share/datasets/fashion-mnist``.
The data set has a train and a test split only: a seeded, class-stratified 10 % of
train becomes the validation split.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from common.data.medmnist_npz import DATA_DIR_ENV
from common.data.splits import DataFileError, ImageSplits

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
