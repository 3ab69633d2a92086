"""Decode one image file (an ordinary picture or a DICOM file) into a uint8 array.

Every reader returns ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 pixels, or raises
:class:`UnreadableImage` with a reason a person can act on; callers skip and
count such files. :func:`fit_image` then gives an image the site's channels and
the run's square size.

High-depth pixels (16-bit or float pictures, DICOM) are windowed to 8 bits by
their own minimum and maximum; the window centre/width a DICOM file may carry is
not used. MONOCHROME1 DICOM images (white is low) are inverted so that white is
high in every image.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

ImageReader = Callable[[Path], np.ndarray]

_GREY_MODES = ("1", "L", "LA", "La")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# ITU-R 601-2 luma with PIL's fixed-point weights (sum 2**16), so grey from an RGB
# array equals PIL's convert("L").
_LUMA_WEIGHTS = np.array([19595, 38470, 7471], dtype=np.uint32)


class UnreadableImage(ValueError):
    """A file is not an image fedshift can use; the message says why."""


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map ``pixels`` linearly so that their minimum is 0 and their maximum 255.

    A constant image becomes all zeros.
    """
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def read_picture(path: Path) -> np.ndarray:
    """Read an ordinary image file (PNG, JPEG, TIFF, BMP, ...) with Pillow.

    The EXIF orientation is applied; alpha is dropped; palette and CMYK images
    become RGB; 16-bit and float grey images are windowed to 8 bits.

    Raises
    ------
    UnreadableImage
        When Pillow cannot decode the whole file, or it holds several frames.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    raise UnreadableImage(f"it holds {frames} frames; save one image per file")
                opened.load()
                image = ImageOps.exif_transpose(opened)
                if image.mode in _GREY_MODES:
                    return np.asarray(image.convert("L"))
                if image.mode in _HIGH_DEPTH_MODES:
                    return window_to_uint8(np.asarray(image))
                return np.asarray(image.convert("RGB"))
    except UnreadableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"not a readable image ({exc})") from None


def read_dicom(path: Path) -> np.ndarray:
    """Read the pixels of a single-frame DICOM file with pydicom.

    The modality LUT (rescale slope and intercept) is applied, grey values are
    windowed to 8 bits by their minimum and maximum, and MONOCHROME1 images are
    inverted. Colour images come out as RGB.

    Raises
    ------
    UnreadableImage
        When the file is not DICOM, has no pixel data, holds several frames, or
        its pixel data cannot be decoded (e.g. a compressed transfer syntax
        without the matching decoder package installed).
    """
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise UnreadableImage(f"not a readable DICOM file ({exc})") from None
    if "PixelData" not in dataset:
        raise UnreadableImage("the DICOM file has no pixel data (a DICOMDIR or a report?)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnreadableImage(
            f"multi-frame DICOM ({frames} frames); export one frame per file"
        )
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise UnreadableImage(f"cannot decode the DICOM pixel data ({exc})") from None
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples == 3 and pixels.ndim == 3 and pixels.shape[-1] == 3:
        return window_to_uint8(pixels) if pixels.dtype != np.uint8 else pixels
    if samples != 1 or pixels.ndim != 2:
        raise UnreadableImage(
            f"unsupported DICOM pixel layout: {samples} samples per pixel, shape {pixels.shape}"
        )
    grey = window_to_uint8(apply_modality_lut(pixels, dataset))
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def match_channels(pixels: np.ndarray, channels: int, stacked: bool = False) -> np.ndarray:
    """Give uint8 images ``channels`` channels (colour on the last axis).

    Parameters
    ----------
    pixels : np.ndarray
        One image, ``(H, W)`` grey or ``(H, W, 3)`` RGB, or with ``stacked`` a
        stack of them, ``(N, H, W)`` or ``(N, H, W, 3)``.
    channels : int
        1 (grey: ITU-R 601 luma, as Pillow's ``convert("L")`` computes it) or 3
        (RGB; grey is copied into each channel).
    stacked : bool (default: False)
        Whether ``pixels`` is a stack of images.
    """
    colour = pixels.ndim == (4 if stacked else 3)
    if channels == 1:
        if not colour:
            return pixels
        weighted = pixels.astype(np.uint32) @ _LUMA_WEIGHTS + (1 << 15)
        return (weighted >> 16).astype(np.uint8)
    if channels == 3:
        return pixels if colour else np.repeat(pixels[..., None], 3, axis=-1)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def fit_image(pixels: np.ndarray, channels: int, size: int) -> np.ndarray:
    """One image with ``channels`` channels, resized to ``size`` x ``size``.

    The aspect ratio is not kept (as MedMNIST's squares); Pillow's bilinear
    filter with antialiasing resamples.

    Parameters
    ----------
    pixels : np.ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 pixels.
    channels : int
        1 or 3, see :func:`match_channels`.
    size : int
        Side of the square output.

    Returns
    -------
    np.ndarray
        ``(size, size)`` when ``channels`` is 1, else ``(size, size, 3)``, uint8.
    """
    fitted = match_channels(pixels, channels)
    if fitted.shape[:2] == (size, size):
        return fitted
    return np.asarray(Image.fromarray(fitted).resize((size, size), Image.Resampling.BILINEAR))
