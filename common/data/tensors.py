"""Turn uint8 image arrays into normalised-size float tensors a model takes."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def to_model_input(images: np.ndarray, size: int) -> torch.Tensor:
    """Convert (N, H, W) or (N, H, W, C) uint8 images to (N, C, size, size) floats in [0, 1].

    Raises
    ------
    ValueError
        When the array is not a stack of 2D grey or colour images.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images have shape {images.shape}; expected (N, H, W) grey or (N, H, W, C) "
            "with C in (1, 3)"
        )
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous()
