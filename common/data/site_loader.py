"""A deployed site's own data, from a MedMNIST file, an image tree or a DICOM tree.

:func:`load_site_images` turns the site's data path into a
:class:`common.data.splits.SiteData` at the run's image size, with the
site's channel count, and reports what it skipped. Loads are cached per
(path, format, channels, image size, site name) within a process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common.data.image_files import match_channels, read_dicom, read_picture
from common.data.image_folder import SkippedFile, TreeImages, load_image_tree
from common.data.medmnist_npz import load_medmnist
from common.data.splits import SPLITS, SiteData
from common.data.tensors import to_model_input

logger = logging.getLogger(__name__)

FORMATS = ("medmnist", "imagefolder", "dicom")


@dataclass(frozen=True)
class SiteImages:
    """A site's data and what its loader found.

    ``data`` holds every split at the run's size (``"pool"``: the unlabelled
    deployment pool, images only, present when the tree has ``deploy/``);
    ``class_names`` names label ``i``; ``skipped`` lists the files not used;
    ``min_size`` / ``max_size`` are the smallest and largest ``(H, W)`` read.
    """

    data: SiteData
    class_names: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]
    min_size: tuple[int, int]
    max_size: tuple[int, int]

    def skipped_in(self, split: str) -> int:
        """Files skipped in ``split`` (train, val, test or pool)."""
        return sum(1 for s in self.skipped if s.split == split)


def _from_medmnist(path: Path, channels: int) -> TreeImages:
    splits = load_medmnist(path)
    heights = [splits.images[s].shape[1] for s in SPLITS]
    widths = [splits.images[s].shape[2] for s in SPLITS]
    matched = {s: match_channels(splits.images[s], channels, stacked=True) for s in SPLITS}
    return TreeImages(
        splits=dataclasses.replace(splits, images=matched),
        class_names=tuple(str(i) for i in range(splits.num_classes)),
        skipped=(), min_size=(min(heights), min(widths)), max_size=(max(heights), max(widths)),
    )


@functools.lru_cache(maxsize=2)
def load_site_images(path: Path, data_format: str, channels: int, image_size: int,
                     name: str) -> SiteImages:
    """Load a site's data (cached: a SuperNode process reads it once).

    Parameters
    ----------
    path : Path
        A MedMNIST ``.npz`` file, or the root of an image or DICOM tree (layouts in
        :mod:`common.data.image_folder`).
    data_format : str
        ``medmnist``, ``imagefolder`` (pictures Pillow reads) or ``dicom``.
    channels : int
        1 (grey) or 3 (RGB); every image is converted to this.
    image_size : int
        Side of the square images the model takes (the run's ``image-size``).
    name : str
        The site's name, carried by the returned ``SiteData``.

    Returns
    -------
    SiteImages
        The site's data, class names, skipped files and original image sizes.

    Raises
    ------
    DataFileError
        When the path holds no usable data (the message says what was expected).
    ValueError
        When ``data_format`` or ``channels`` is not one of the values above.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if data_format == "medmnist":
        tree = _from_medmnist(Path(path), channels)
    elif data_format in ("imagefolder", "dicom"):
        reader = read_dicom if data_format == "dicom" else read_picture
        tree = load_image_tree(Path(path), reader, channels, image_size)
    else:
        raise ValueError(f"data format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    images = {s: to_model_input(x, image_size) for s, x in tree.splits.images.items()}
    labels = {s: torch.from_numpy(y) for s, y in tree.splits.labels.items()}
    data = SiteData(name, images, labels, num_classes=len(tree.class_names))
    logger.info("%s: %s images from %s (%s), %d files skipped", name,
                "/".join(f"{s} {len(x)}" for s, x in images.items()), path, data_format,
                len(tree.skipped))
    return SiteImages(data=data, class_names=tree.class_names, skipped=tree.skipped,
                      min_size=tree.min_size, max_size=tree.max_size)

