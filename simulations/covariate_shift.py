"""Covariate shifts with a physical meaning, injected into simulated sites' images.

Every shift is a pure function of a float image batch (N, C, S, S) in [0, 1], a
``severity`` >= 0 and a seeded ``torch.Generator``: severity 0 leaves the images as
they are, 1, 2 and 3 are a mild, moderate and strong shift, and the change grows
monotonically with severity. Sizes (blur width, resolution) are fractions of the
image width, so a severity means the same at every ``image_size``. Results are
clamped to [0, 1].

- ``gamma``: the response curve of another detector, ``x ** (1 + 0.2 * severity)``.
- ``noise``: additive Gaussian sensor noise of standard deviation ``0.04 * severity``.
- ``blur``: the Gaussian point-spread function of a softer reconstruction kernel,
  standard deviation ``0.02 * severity * S`` pixels.
- ``resolution``: a lower-resolution scanner: downsampled by ``1 + severity``
  (antialiased) and upsampled back to S x S.
- ``offset``: a brightness offset of ``0.05 * severity``.
- ``scanner``: another scanner and protocol: ``blur`` and ``noise`` at half the
  severity, then ``gamma`` at the full severity.
- ``inversion``: a wrong display window ending in inverted intensities (a
  photometric interpretation read the other way): the linear lookup
  ``a + (1 - 2 a) x`` with ``a = severity / 3`` (at most 1): contrast falls, is gone
  at severity 1.5 and returns inverted, fully at 3.
- ``portable``: a low-end (bedside) scanner: ``resolution`` then ``noise``, both at
  the full severity.

A site may have several shifts, applied in order (:class:`ShiftStep`,
:func:`apply_shifts`); :func:`shift_seed` derives the seed of a site's split from
the run's seed, the one rule both scenario files and studies use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from common.federation_config import ConfigError

Shift = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]

GAMMA_PER_SEVERITY = 0.2
NOISE_STD_PER_SEVERITY = 0.04
BLUR_WIDTH_PER_SEVERITY = 0.02
DOWNSAMPLE_PER_SEVERITY = 1.0
OFFSET_PER_SEVERITY = 0.05
INVERSION_FULL_SEVERITY = 3.0
SHIFT_STREAM = 2
"""The stream of a run's seed reserved for covariate shifts (scenario files number
their other streams around it)."""


def gamma(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Another detector's response curve: ``images ** (1 + 0.2 * severity)``.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Unused (the shift is deterministic); part of the common signature.
    """
    return images.clamp(0.0, 1.0) ** (1.0 + GAMMA_PER_SEVERITY * severity)


def noise(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian sensor noise of standard deviation ``0.04 * severity``.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Source of the noise; the same seed gives the same noise at every severity,
        so the change grows with severity pixel by pixel.
    """
    draw = torch.randn(images.shape, generator=generator, device=images.device,
                       dtype=images.dtype)
    return (images + NOISE_STD_PER_SEVERITY * severity * draw).clamp(0.0, 1.0)


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def blur(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A softer reconstruction kernel: Gaussian blur of width ``0.02 * severity * S`` pixels.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Unused (the shift is deterministic); part of the common signature.
    """
    sigma = BLUR_WIDTH_PER_SEVERITY * severity * images.shape[-1]
    if sigma == 0:
        return images.clone()
    kernel = _gaussian_kernel(sigma, images.dtype, images.device)
    channels, radius = images.shape[1], len(kernel) // 2
    # Reflect padding needs a pad smaller than the image; wider kernels fall back to
    # replicating the border.
    mode = "reflect" if radius < images.shape[-1] else "replicate"
    out = F.pad(images, (radius, radius, radius, radius), mode=mode)
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.conv2d(out, rows, groups=channels), cols, groups=channels)
    return out.clamp(0.0, 1.0)


def resolution(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A lower-resolution scanner: downsample by ``1 + severity``, upsample back.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Unused (the shift is deterministic); part of the common signature.
    """
    size = images.shape[-1]
    low = max(2, round(size / (1.0 + DOWNSAMPLE_PER_SEVERITY * severity)))
    if low >= size or len(images) == 0:
        return images.clone()
    small = F.interpolate(images, size=(low, low), mode="bilinear", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=(size, size), mode="bilinear",
                         align_corners=False).clamp(0.0, 1.0)


def offset(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A brightness offset: ``images + 0.05 * severity``.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Unused (the shift is deterministic); part of the common signature.
    """
    return (images + OFFSET_PER_SEVERITY * severity).clamp(0.0, 1.0)


def scanner(images: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Another scanner and protocol: blur and noise at half the severity, then gamma.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Source of the sensor noise.
    """
    out = noise(blur(images, 0.5 * severity, generator), 0.5 * severity, generator)
    return gamma(out, severity, generator)


def inversion(images: torch.Tensor, severity: float, generator: torch.Generator
              ) -> torch.Tensor:
    """A wrong display window: ``a + (1 - 2 a) x`` with ``a = min(1, severity / 3)``.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity; 3 and more: fully inverted).
    generator : torch.Generator
        Unused (the shift is deterministic); part of the common signature.
    """
    a = min(1.0, severity / INVERSION_FULL_SEVERITY)
    return a + (1.0 - 2.0 * a) * images


def portable(images: torch.Tensor, severity: float, generator: torch.Generator
             ) -> torch.Tensor:
    """A low-end (bedside) scanner: lower resolution, then sensor noise, both at ``severity``.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1].
    severity : float
        Strength of the shift, >= 0 (0: identity).
    generator : torch.Generator
        Source of the sensor noise.
    """
    return noise(resolution(images, severity, generator), severity, generator)


SHIFTS: dict[str, Shift] = {
    "gamma": gamma,
    "noise": noise,
    "blur": blur,
    "resolution": resolution,
    "offset": offset,
    "scanner": scanner,
    "inversion": inversion,
    "portable": portable,
}


@dataclass(frozen=True)
class ShiftStep:
    """One covariate shift of a site: a kind of :data:`SHIFTS` at a severity.

    Raises
    ------
    ConfigError
        When ``kind`` is unknown or ``severity`` is negative or not finite.
    """

    kind: str
    severity: float

    def __post_init__(self) -> None:
        if self.kind not in SHIFTS:
            raise ConfigError(
                f"unknown covariate shift {self.kind!r}; valid kinds: {', '.join(SHIFTS)}"
            )
        usable = isinstance(self.severity, int | float) and not isinstance(self.severity, bool)
        if not (usable and math.isfinite(self.severity) and self.severity >= 0):
            raise ConfigError(
                f"covariate shift severity must be a finite number >= 0 (0: none, 1-3: mild "
                f"to strong), got {self.severity!r}"
            )
        object.__setattr__(self, "severity", float(self.severity))


def apply_shifts(images: torch.Tensor, steps: Sequence[ShiftStep], seed: int = 0
                 ) -> torch.Tensor:
    """Apply ``steps`` in order to an image batch, all drawing from one seeded generator.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, S, S) floats in [0, 1]; left unchanged.
    steps : Sequence[ShiftStep]
        The shifts, applied first to last (none: the images as they are).
    seed : int (default: 0)
        Seed of the random parts (sensor noise); the same seed gives the same result.

    Returns
    -------
    torch.Tensor
        The shifted images, same shape, clamped to [0, 1].

    Raises
    ------
    ValueError
        When ``images`` is not a float (N, C, S, S) batch.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2] or not images.is_floating_point():
        raise ValueError(
            f"images have shape {tuple(images.shape)} and dtype {images.dtype}; expected "
            "floats (N, C, S, S) in [0, 1]"
        )
    generator = torch.Generator(device=images.device).manual_seed(seed)
    out = images
    for step in steps:
        out = SHIFTS[step.kind](out, step.severity, generator).clamp(0.0, 1.0)
    return out.clone() if out is images else out


def apply_shift(images: torch.Tensor, kind: str, severity: float, seed: int = 0) -> torch.Tensor:
    """Apply the one shift ``kind`` of strength ``severity`` (see :func:`apply_shifts`).

    Raises
    ------
    ConfigError
        When ``kind`` is unknown or ``severity`` is negative or not finite.
    ValueError
        When ``images`` is not a float (N, C, S, S) batch.
    """
    return apply_shifts(images, (ShiftStep(kind, severity),), seed)


def shift_seed(seed: int, site: int, split: int) -> int:
    """Seed of the shifts of split number ``split`` of site number ``site`` in a run."""
    return int(np.random.SeedSequence([seed, SHIFT_STREAM, site, split]).generate_state(1)[0])
