"""The names and types every data reader, partitioner and site loader shares.

A data set or a site's data comes in splits: the labelled ``train``, ``val`` and
``test`` (:data:`SPLITS`) and, at a site, the unlabelled deployment ``pool``
(:data:`POOL`). Readers return :class:`ImageSplits` (uint8 pixels as stored);
what a site trains and evaluates on is :class:`SiteData` (float tensors at the
run's size), in simulation and deployment alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
"""The labelled splits, in the order they are stored and reported."""
POOL = "pool"
"""The unlabelled deployment pool of a site (its labels, if any, are for scoring only)."""
SITE_SPLITS = (*SPLITS, POOL)
"""Every split a site can hold."""


class DataFileError(FileNotFoundError):
    """A data file is missing, cannot be downloaded, or does not have the expected content."""


@dataclass(frozen=True)
class ImageSplits:
    """Images (N, H, W) or (N, H, W, C) uint8 and integer labels (N,) per split.

    ``images`` may hold :data:`POOL` (unlabelled, so absent from ``labels``);
    ``source`` is the file or folder read.
    """

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    num_classes: int
    source: Path


@dataclass(frozen=True)
class SiteData:
    """One site's images (N, C, S, S) in [0, 1] and labels (N,) per split."""

    name: str
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.images["train"].shape[1]
