"""A site's own statistics for the first frozen normalisation layers, estimated under DP.

The backbone normalises with frozen pretrained statistics
(:class:`~common.frozen_batchnorm.FrozenNorm`), so a site whose scanner differs sees
activations those statistics no longer standardise. AdaBN re-estimates them from
the site's own images; FedBN keeps such site-specific parts at the site. Here a
site re-estimates the statistics of the first ``layers`` normalisation layers from
its training images and keeps them to itself; they never travel.

Raw statistics of private images are not private, and DP-SGD's per-sample bound
assumes that one image's output does not depend on the others, so the statistics
are estimated with a Gaussian mechanism; training on them is then post-processing
plus DP-SGD, composed. For each image and channel ``c`` of a layer's input ``x``,
standardised by the layer's pretrained statistics (``z = (x - mean) / sqrt(var + eps)``),
two averages over the spatial positions, ``mean(z)`` and ``mean(z**2) - 1``, form
the image's moment vector (``2 C`` values, both 0 on average where the pretrained
statistics fit). Each image's vector is clipped to L2 norm ``clip * sqrt(2 C)``
(``clip`` bounds its root mean square entry), the clipped vectors are summed and
Gaussian noise of std ``noise_multiplier`` times that bound is added
(:func:`common.private_summaries.noisy_clipped_sum`); the sum is divided by the
number of images, released once with noise of std ``noise_multiplier``. From the
mean moments ``m1`` and ``m2`` the layer's new statistics are
``mean + sqrt(var + eps) * m1`` and ``(var + eps) * max(1 + m2 - m1**2, floor)``
(post-processing; the floor keeps a noisy variance positive).

Layers are estimated **sequentially**: layer ``k``'s moments are taken under the
statistics already adapted at layers ``0 .. k-1``, which is what the layer sees when
the site trains and predicts. A joint estimate (every layer under the pretrained
statistics, in one pass) costs exactly the same privacy (below) but describes
inputs the adapted model never produces.

Privacy: each layer's sum is one Gaussian mechanism of multiplier ``z``, the count one
more; ``K + 1`` Gaussian mechanisms of multiplier ``z`` on the same records compose
(adaptively, under RDP and PRV alike, exactly) to one of multiplier
``z / sqrt(K + 1)``, which is what :func:`adaptation_release` tells the ledger to
charge. The noise on each statistic grows with the square root of the layer's
channels (the clip bound does), and the cost with the number of layers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.frozen_batchnorm import FrozenNorm
from common.norm_moments import norm_layers
from common.privacy_accounting import GaussianRelease
from common.private_summaries import combined_noise_multiplier, noisy_clipped_sum

MIN_VARIANCE_RATIO = 0.1
"""Floor of an adapted variance over the pretrained ``var + eps``."""


@dataclass(frozen=True)
class NormStatistics:
    """Per-channel mean and variance of one normalisation layer (float64 vectors)."""

    mean: np.ndarray
    var: np.ndarray


def adapted_layers(model: nn.Module, layers: int) -> list[tuple[str, FrozenNorm]]:
    """The first ``layers`` frozen normalisation layers of ``model``, in module order.

    Raises
    ------
    ValueError
        When the model has fewer.
    """
    found = norm_layers(model)
    if layers > len(found):
        raise ValueError(f"adapt-norm-layers = {layers}, but the model has only {len(found)} "
                         "frozen normalisation layers")
    return found[:layers]


def moment_bound(channels: int, clip: float) -> float:
    """L2 bound of one image's moment vector of a layer with ``channels`` channels."""
    return clip * math.sqrt(2 * channels)


def image_moments(x: torch.Tensor, norm: FrozenNorm) -> torch.Tensor:
    """(N, 2C) float64: per image, the spatial means of ``z`` and of ``z**2 - 1``.

    Parameters
    ----------
    x : torch.Tensor
        (N, C, ...) input of the layer ``norm``.
    norm : FrozenNorm
        The layer whose statistics standardise ``x`` into ``z``.
    """
    shape = (1, -1, *([1] * (x.ndim - 2)))
    z = (x.double() - norm.mean.double().view(shape)) * torch.rsqrt(
        norm.var.double().view(shape) + norm.eps)
    spatial = tuple(range(2, x.ndim))
    return torch.cat([z.mean(dim=spatial), (z**2).mean(dim=spatial) - 1.0], dim=1)


def statistics_from_moments(moments: np.ndarray, reference: NormStatistics, eps: float,
                            min_ratio: float = MIN_VARIANCE_RATIO) -> NormStatistics:
    """A layer's statistics from its mean moment vector (pure post-processing).

    Parameters
    ----------
    moments : np.ndarray
        (2C,) mean over images of :func:`image_moments` (noisy or exact).
    reference : NormStatistics
        The statistics ``z`` was standardised by.
    eps : float
        The layer's epsilon (added to the variance before the square root).
    min_ratio : float (default: MIN_VARIANCE_RATIO)
        Floor of the new variance over the reference's ``var + eps``.
    """
    channels = len(reference.mean)
    m1, m2 = moments[:channels], moments[channels:]
    scale = reference.var + eps
    ratio = np.maximum(1.0 + m2 - m1**2, min_ratio)
    return NormStatistics(mean=reference.mean + np.sqrt(scale) * m1, var=scale * ratio)


class _Captured(Exception):
    """Raised by the capturing hook: nothing after the layer needs computing."""


@torch.no_grad()
def layer_moments(model: nn.Module, name: str, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """(N, 2C) :func:`image_moments` of the input of layer ``name`` over ``images``.

    The forward pass of each batch stops at the layer.
    """
    norm = model.get_submodule(name)
    rows: list[torch.Tensor] = []

    def capture(module: FrozenNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        rows.append(image_moments(inputs[0], module).cpu())
        raise _Captured

    hook = norm.register_forward_pre_hook(capture)
    try:
        model.to(device).eval()
        for i in range(0, len(images), batch_size):
            with contextlib.suppress(_Captured):
                model(images[i:i + batch_size].to(device))
    finally:
        hook.remove()
    if not rows:
        return np.zeros((0, 2 * norm.num_features))
    return torch.cat(rows).numpy()


def statistics_of(norm: FrozenNorm) -> NormStatistics:
    """The statistics ``norm`` holds now."""
    return NormStatistics(norm.mean.double().cpu().numpy(), norm.var.double().cpu().numpy())


def apply_statistics(model: nn.Module, statistics: dict[str, NormStatistics]) -> None:
    """Put ``statistics`` (layer name -> statistics) into the model's normalisation layers."""
    with torch.no_grad():
        for name, stats in statistics.items():
            norm = model.get_submodule(name)
            if not isinstance(norm, FrozenNorm) or stats.mean.shape != (norm.num_features,):
                raise ValueError(f"{name} is not a frozen normalisation layer with "
                                 f"{len(stats.mean)} channels")
            norm.mean.copy_(torch.from_numpy(stats.mean))
            norm.var.copy_(torch.from_numpy(stats.var))


def estimate_statistics(model: nn.Module, layers: int, images: torch.Tensor, clip: float,
                        noise_multiplier: float | None, rng: np.random.Generator,
                        device: torch.device) -> dict[str, NormStatistics]:
    """The site's statistics of the first ``layers`` normalisation layers, adapted in place.

    Layer by layer, each under the layers adapted before it; ``model`` holds the
    adapted statistics afterwards.

    Parameters
    ----------
    model : nn.Module
        The model, with its pretrained statistics.
    layers : int
        Normalisation layers to adapt, from the first (see :func:`adapted_layers`).
    images : torch.Tensor
        The site's training images.
    clip : float
        Bound on the root mean square entry of one image's moment vector.
    noise_multiplier : float or None
        Gaussian noise multiplier of every layer's sum and of the count (the ledger
        charges :func:`adaptation_release`); None: exact statistics, for runs
        without DP.
    rng : np.random.Generator
        Source of the noise.
    device : torch.device
        Where the forward passes run.
    """
    count = float(len(images))
    if noise_multiplier is not None:
        count = max(1.0, count + rng.normal(0.0, noise_multiplier))
    out = {}
    for name, norm in adapted_layers(model, layers):
        vectors = layer_moments(model, name, images, device)
        if noise_multiplier is None:
            mean = vectors.mean(axis=0)
        else:
            total, _ = noisy_clipped_sum(vectors, moment_bound(norm.num_features, clip),
                                         noise_multiplier, rng)
            mean = total / count
        out[name] = statistics_from_moments(mean, statistics_of(norm), norm.eps)
        apply_statistics(model, {name: out[name]})
    return out


def adaptation_release(noise_multiplier: float, layers: int) -> GaussianRelease:
    """What :func:`estimate_statistics` at ``noise_multiplier`` over ``layers`` layers costs:
    ``layers`` sums and one count, one Gaussian mechanism of multiplier
    ``noise_multiplier / sqrt(layers + 1)``."""
    return GaussianRelease(combined_noise_multiplier(*[noise_multiplier] * (layers + 1)), 1.0, 1)
