"""Per-image normalisation-layer features: definition, layer choice, centring and bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.frozen_batchnorm import FrozenNorm
from common.norm_moments import (
    bounded_blocks,
    image_moments,
    layer_features,
    moment_layout,
    soft_clip,
)

CPU = torch.device("cpu")


def _stack(layers: int, channels: int = 3) -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(*[
        FrozenNorm(torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5)
        for _ in range(layers)
    ])


def test_layers_are_evenly_spaced_from_first_to_last() -> None:
    layout = moment_layout(_stack(9), layers=3, clip=1.0)
    assert layout.layer_names == ("0", "4", "8")
    assert moment_layout(_stack(2), layers=5, clip=1.0).layer_names == ("0", "1")
    assert layout.sensitivity == pytest.approx(1.0 * np.sqrt(2 * 3))
    with pytest.raises(ValueError, match="no frozen normalisation layers"):
        moment_layout(nn.Linear(2, 2), layers=3, clip=1.0)


def test_features_are_the_mean_offset_and_spread_of_the_standardised_input() -> None:
    model = _stack(1)
    norm = model[0]
    images = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    got = layer_features(model, moment_layout(model, 1, 1.0), images, CPU)
    z = ((images - norm.mean.view(1, -1, 1, 1)) / torch.sqrt(norm.var.view(1, -1, 1, 1) + norm.eps)
         ).double()
    offset = (z.mean(dim=(2, 3)) ** 2).mean(dim=1)
    spread = z.var(dim=(2, 3), unbiased=False).mean(dim=1) - 1
    np.testing.assert_allclose(got[:, 0, 0], offset.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[:, 0, 1], spread.numpy(), rtol=1e-5, atol=1e-6)


def test_blocks_are_centred_per_class_clipped_and_carry_their_squared_norm() -> None:
    model = _stack(4)
    layout = moment_layout(model, 2, clip=0.5)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(40, 3, 5, 5, generator=gen) * 3
    labels = np.arange(40) % 2
    features = layer_features(model, layout, images, CPU)
    centre = np.stack([features[labels == y].mean(axis=0) for y in (0, 1)])
    blocks = image_moments(model, layout, images, labels, centre, CPU)
    norms = np.linalg.norm(blocks[:, :, :-1], axis=2)
    assert norms.max() < 0.5
    np.testing.assert_allclose(blocks[:, :, -1], norms**2 / 0.5)
    loose = moment_layout(model, 2, clip=1e6)
    centred = image_moments(model, loose, images, labels, centre, CPU)
    deviations = features - centre[labels]
    np.testing.assert_allclose(centred[:, :, :-1], deviations, rtol=1e-4, atol=1e-9)
    for y in (0, 1):
        np.testing.assert_allclose(centred[labels == y, :, :-1].sum(axis=0), 0.0, atol=1e-4)


def test_soft_clip_keeps_the_hard_clip_bound_but_never_saturates() -> None:
    clip = 0.3
    deviations = np.array([0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 100.0])
    single = soft_clip(np.stack([deviations, np.zeros_like(deviations)], axis=1), clip)[:, 0]
    assert single[0] == 0 and np.all(np.diff(single) > 0), single
    bound = clip / np.sqrt(2)
    assert single.max() < bound
    assert single[2] > 0.5 * 0.2 and single[1] == pytest.approx(0.1 / (1 + 0.1 / bound))
    # The whole block (features and |u|^2 / clip) stays within sqrt(2) * clip, the
    # bound the sensitivity of the release assumes: the same as a hard clip to clip.
    rng = np.random.default_rng(0)
    blocks = bounded_blocks(rng.normal(0, 50, size=(1000, 3, 2)), clip)
    assert np.linalg.norm(blocks[:, :, :-1], axis=2).max() < clip
    assert np.linalg.norm(blocks, axis=2).max() <= np.sqrt(2) * clip
