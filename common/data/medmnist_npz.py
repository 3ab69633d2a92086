"""Find, download and load MedMNIST ``.npz`` files.

``<flag>.npz`` holds 28 x 28 images; MedMNIST+ publishes ``<flag>_64.npz``,
``<flag>_128.npz`` and ``<flag>_224.npz`` with the same arrays at those sizes. At an
image size MedMNIST+ publishes, the native file is wanted first: it is looked for
in the search directories (an explicit data directory, ``$FEDSHIFT_DATA_DIR``,
``~/.medmnist``, MedMNIST's own default), then downloaded into the first of them.
Failing that, the 28 px file goes the same way, and last comes the copy shipped
inside the package (PneumoniaMNIST only), so the default runs offline. After a
download fails for want of a network no other is tried; when nothing is found the
error names the file and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.atomic_files import atomic_write
from common.data.splits import SPLITS, DataFileError, ImageSplits

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDSHIFT_DATA_DIR"
BASE_SIDE = 28
"""Side in pixels of the images in ``<flag>.npz``."""
NATIVE_SIDES = (64, 128, 224)
"""Sides MedMNIST+ publishes besides 28, as ``<flag>_<side>.npz``."""
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data_files"
"""Where the package keeps its own copy of PneumoniaMNIST (28 px; CC BY 4.0, see its README)."""
_SHIPPED_IN_DISTRIBUTION = "common/data_files"
_UPSAMPLING_SAID: set[tuple[Path, int]] = set()


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for a data file, in order (the shipped copy comes after them)."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    dirs.append(Path("~/.medmnist").expanduser())
    return dirs


def medmnist_filename(flag: str, side: int = BASE_SIDE) -> str:
    """MedMNIST's file name for ``flag`` at ``side`` px: ``<flag>.npz`` or ``<flag>_<side>.npz``."""
    return f"{flag}.npz" if side == BASE_SIDE else f"{flag}_{side}.npz"


def native_side(image_size: int) -> int:
    """The side of the file read for ``image_size``: itself where MedMNIST+ publishes it,
    else 28."""
    return image_size if image_size in NATIVE_SIDES else BASE_SIDE


def _shipped_dirs() -> list[Path]:
    """This module's data folder, then the installed distribution's.

    ``flwr run`` imports the app's own copy of the code, which carries no data
    files; the installed ``fedshift`` (a wheel, or an editable checkout) does.
    """
    dirs = [SHIPPED_DIR]
    try:
        dist = metadata.distribution("fedshift")
    except metadata.PackageNotFoundError:
        return dirs
    dirs.append(Path(str(dist.locate_file(_SHIPPED_IN_DISTRIBUTION))))
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        source = urllib.parse.urlparse(direct_url.get("url", ""))
        if source.scheme == "file":
            dirs.append(Path(urllib.request.url2pathname(source.path)) / _SHIPPED_IN_DISTRIBUTION)
    return dirs


def shipped_file(flag: str) -> Path | None:
    """The package's own copy of ``<flag>.npz``, if it ships one."""
    for directory in _shipped_dirs():
        if (directory / medmnist_filename(flag)).is_file():
            return directory / medmnist_filename(flag)
    return None


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is a data file the package ships."""
    return any(path.resolve().parent == d.resolve() for d in _shipped_dirs())


def native_file_advice(flag: str, side: int, image_size: int,
                       data_dir: str | Path | None = None) -> str | None:
    """Where to put ``flag``'s native file when its ``side`` px file is upsampled to an
    ``image_size`` MedMNIST+ publishes; None when that is not the case."""
    if side >= image_size or native_side(image_size) == BASE_SIDE:
        return None
    return (f"place {medmnist_filename(flag, image_size)} in {candidate_dirs(data_dir)[0]} "
            "for native resolution")


def _say_upsampled(path: Path, side: int, image_size: int, data_dir: str | Path | None
                   ) -> None:
    """Log, once per file and size in this process, that ``path`` is upsampled."""
    advice = native_file_advice(path.stem, side, image_size, data_dir)
    if advice is not None and (path, image_size) not in _UPSAMPLING_SAID:
        _UPSAMPLING_SAID.add((path, image_size))
        logger.warning("using %d px %s upsampled to %d px; %s", side, path.name, image_size,
                       advice)


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


def _download_source(flag: str, side: int) -> tuple[str, str | None] | None:
    """MedMNIST's URL and MD5 of ``flag`` at ``side`` px, from the installed ``medmnist``."""
    try:
        from medmnist.info import INFO
    except ImportError:
        return None
    info = INFO.get(flag, {})
    suffix = "" if side == BASE_SIDE else f"_{side}"
    if f"url{suffix}" not in info:
        return None
    return info[f"url{suffix}"], info.get(f"MD5{suffix}")


def _fetched(flag: str, side: int, target: Path) -> tuple[bool, str, bool]:
    """Download ``flag`` at ``side`` px to ``target``.

    Returns whether it worked, why not, and whether the network is down (no more
    downloads are worth trying then).
    """
    url, md5 = _download_source(flag, side) or ("", None)
    if not url:
        return False, f"MedMNIST publishes no {side} px file of {flag!r}", False
    logger.info("downloading %s to %s", url, target)
    try:
        _download(url, md5, target)
    except (urllib.error.URLError, OSError) as exc:
        reason = f"the download from {url} failed ({exc})"
        logger.warning("%s not found and %s; going on without it", target.name, reason)
        return False, reason, isinstance(exc, urllib.error.URLError | TimeoutError |
                                         ConnectionError)
    return True, "", False


def find_medmnist_file(flag: str, data_dir: str | Path | None = None, download: bool = True,
                       image_size: int = BASE_SIDE) -> Path:
    """Return the path of the MedMNIST file to read for ``flag`` at ``image_size`` px.

    The native file where MedMNIST+ publishes ``image_size``, else ``<flag>.npz``;
    each searched for, then downloaded when allowed; last the shipped copy (see the
    module docstring for the order). Logs a warning when a 28 px file will be
    upsampled to a size MedMNIST+ publishes.

    Raises
    ------
    DataFileError
        When no file is found, downloaded or shipped; the message says where to put it.
    """
    dirs = candidate_dirs(data_dir)
    online, reason = download, "downloading is turned off"
    for side in dict.fromkeys((native_side(image_size), BASE_SIDE)):
        filename = medmnist_filename(flag, side)
        found = next((d / filename for d in dirs if (d / filename).is_file()), None)
        if found is None and online:
            fetched, reason, offline = _fetched(flag, side, dirs[0] / filename)
            found, online = (dirs[0] / filename if fetched else None), not offline
        if found is not None:
            _say_upsampled(found, side, image_size, data_dir)
            return found
    shipped = shipped_file(flag)
    if shipped is not None:
        logger.info("using the shipped copy %s", shipped)
        _say_upsampled(shipped, BASE_SIDE, image_size, data_dir)
        return shipped
    filename = medmnist_filename(flag)
    searched = ", ".join(str(d) for d in dirs)
    source = _download_source(flag, BASE_SIDE)
    if source is None:
        raise DataFileError(
            f"{filename} not found (searched {searched}) and {flag!r} is not a MedMNIST "
            "dataset fedshift can download; place the file in one of those directories"
        )
    raise DataFileError(
        f"{filename} not found (searched {searched}) and {reason}. Put {filename} "
        f"(from {source[0]}) at {dirs[0] / filename}, or pass --data-dir / set "
        f"${DATA_DIR_ENV} to the directory that holds it"
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
