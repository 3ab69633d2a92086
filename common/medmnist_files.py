"""Find, download and load MedMNIST ``.npz`` files.

Lookup order for ``<flag>.npz``: an explicit data directory, then
``$FEDSHIFT_DATA_DIR``, then ``~/.medmnist`` (MedMNIST's own default). When none
holds the file it is downloaded into the first of those places; offline,
the error names the file and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.atomic_files import atomic_write

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDSHIFT_DATA_DIR"
SPLITS = ("train", "val", "test")


class DataFileError(FileNotFoundError):
    """A data file is missing, cannot be downloaded, or does not have the expected content."""


@dataclass(frozen=True)
class ImageSplits:
    """Images (N, H, W) or (N, H, W, C) uint8 and integer labels (N,) per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    num_classes: int
    source: Path


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for a data file, in order."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    dirs.append(Path("~/.medmnist").expanduser())
    return dirs


def _download(url: str, md5: str | None, target: Path) -> None:
    """Stream ``url`` to ``target`` atomically; a wrong checksum leaves no file behind.

    The checksum is checked before the file takes its name, so ``target`` only ever
    holds a complete, verified download (or nothing).
    """

    def write(fh: BinaryIO) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=30) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                fh.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise DataFileError(f"download of {url} has the wrong checksum; try again")

    atomic_write(target, write)


def find_medmnist_file(
    flag: str, data_dir: str | Path | None = None, download: bool = True
) -> Path:
    """Return the path of ``<flag>.npz``, downloading it when allowed and needed."""
    filename = f"{flag}.npz"
    dirs = candidate_dirs(data_dir)
    for directory in dirs:
        if (directory / filename).is_file():
            return directory / filename
    searched = ", ".join(str(d) for d in dirs)
    try:
        from medmnist.info import INFO
    except ImportError:
        INFO = {}
    info = INFO.get(flag)
    if info is None:
        raise DataFileError(
            f"{filename} not found (searched {searched}) and {flag!r} is not a MedMNIST "
            "dataset fedshift can download; place the file in one of those directories"
        )
    target = dirs[0] / filename
    if download:
        logger.info("downloading %s to %s", info["url"], target)
        try:
            _download(info["url"], info.get("MD5"), target)
            return target
        except (urllib.error.URLError, OSError) as exc:
            reason = f"the download from {info['url']} failed ({exc})"
    else:
        reason = "downloading is turned off"
    raise DataFileError(
        f"{filename} not found (searched {searched}) and {reason}. Put {filename} "
        f"(from {info['url']}) at {target}, or pass --data-dir / set ${DATA_DIR_ENV} "
        "to the directory that holds it"
    )


def load_medmnist(path: Path) -> ImageSplits:
    """Load a 2D MedMNIST npz file and check its shapes."""
    try:
        archive = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path} is not a readable .npz file ({exc})") from exc
    with archive:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")
                   if f"{s}_{k}" not in archive.files]
        if missing:
            raise DataFileError(f"{path} lacks the arrays {missing}; is it a MedMNIST file?")
        images = {s: archive[f"{s}_images"] for s in SPLITS}
        labels = {s: archive[f"{s}_labels"] for s in SPLITS}
    for split in SPLITS:
        img = images[split]
        if img.ndim not in (3, 4) or (img.ndim == 4 and img.shape[-1] not in (1, 3)):
            raise DataFileError(
                f"{path}: {split}_images has shape {img.shape}; expected (N, H, W) grey or "
                "(N, H, W, 3) colour 2D images"
            )
        lab = labels[split]
        if lab.ndim == 2 and lab.shape[1] != 1:
            raise DataFileError(
                f"{path}: {split}_labels has shape {lab.shape}; multi-label tasks are not "
                "supported, one class per image is"
            )
        labels[split] = lab.reshape(-1).astype(np.int64)
        if len(labels[split]) != len(img):
            raise DataFileError(f"{path}: {split} has {len(img)} images but {len(lab)} labels")
    num_classes = int(max(lab.max() for lab in labels.values())) + 1
    return ImageSplits(images=images, labels=labels, num_classes=num_classes, source=path)
