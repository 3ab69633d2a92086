"""Site-adapted normalisation statistics: the DP estimate against the exact one, the
clip, the sequential adaptation and what the ledger charges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.frozen_batchnorm import ChannelAffine, FrozenNorm, NormAffine
from common.norm_adaptation import (
    NormStatistics,
    adaptation_release,
    estimate_statistics,
    image_moments,
    layer_moments,
    moment_bound,
    statistics_from_moments,
    statistics_of,
)
from common.privacy_accounting import GaussianRelease, certify, epsilon_spent
from common.private_summaries import noisy_clipped_sum

CPU = torch.device("cpu")


def _norm(channels: int, mean: float = 0.0, var: float = 1.0) -> FrozenNorm:
    return FrozenNorm(torch.full((channels,), mean), torch.full((channels,), var), eps=1e-5)


def _activations(n: int = 300, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, C, 6, 6) activations whose channels have known, different mean and spread."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.tensor([2.0, -1.0, 0.5, 0.0])[:channels].view(1, -1, 1, 1)
    spread = torch.tensor([0.5, 2.0, 1.0, 3.0])[:channels].view(1, -1, 1, 1)
    per_image = 0.3 * torch.randn(n, channels, 1, 1, generator=g)  # images differ
    return (centre + per_image + spread * torch.randn(n, channels, 6, 6, generator=g)).double()


def _exact(x: torch.Tensor) -> NormStatistics:
    """Per channel, over all images and positions: what BatchNorm's statistics measure."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return NormStatistics(flat.mean(1).numpy(), flat.var(1, unbiased=False).numpy())


def test_exact_moments_give_the_layers_input_statistics() -> None:
    x = _activations()
    norm = _norm(4, mean=0.7, var=2.5)
    moments = image_moments(x, norm).numpy()
    assert moments.shape == (len(x), 8)
    stats = statistics_from_moments(moments.mean(0), statistics_of(norm), norm.eps)
    exact = _exact(x)
    np.testing.assert_allclose(stats.mean, exact.mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.var, exact.var, rtol=1e-9, atol=1e-9)


def test_the_dp_estimate_lies_within_its_noise_of_the_exact_statistics() -> None:
    x = _activations(n=400)
    norm = _norm(4)
    moments = image_moments(x, norm).numpy()
    z, clip = 2.0, 10.0
    bound = moment_bound(4, clip)
    assert np.linalg.norm(moments, axis=1).max() < bound  # nothing clipped: no bias
    exact = moments.mean(0)
    rng = np.random.default_rng(0)
    draws = np.stack([noisy_clipped_sum(moments, bound, z, rng)[0] / len(x)
                      for _ in range(4000)])
    std = z * bound / len(x)
    # Unbiased, with the noise the release states on every entry.
    np.testing.assert_allclose(draws.mean(0), exact, atol=4 * std / math.sqrt(len(draws)))
    np.testing.assert_allclose(draws.std(0), std, rtol=0.05)
    # One release turned into statistics: within a few noise stds of the exact ones.
    one = statistics_from_moments(draws[0], statistics_of(norm), norm.eps)
    truth = _exact(x)
    assert np.all(np.abs(one.mean - truth.mean) < 4 * std)
    assert np.all(np.abs(one.var - truth.var) < 4 * std * (1 + 2 * np.abs(truth.mean)))


def test_the_clip_bounds_what_one_image_moves_the_release() -> None:
    x = _activations(n=50)
    norm = _norm(4)
    moments = image_moments(x, norm).numpy()
    outlier = image_moments(1e3 * x[:1], norm).numpy()
    bound = moment_bound(4, 0.5)
    without, release = noisy_clipped_sum(moments, bound, 1.0, np.random.default_rng(7))
    with_it, _ = noisy_clipped_sum(np.vstack([moments, outlier]), bound, 1.0,
                                   np.random.default_rng(7))
    assert np.linalg.norm(outlier) > 1e4 * bound
    assert np.linalg.norm(with_it - without) == pytest.approx(bound, rel=1e-9)
    assert release == GaussianRelease(1.0, 1.0, 1)


def _two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

    def norm_affine(channels: int) -> NormAffine:
        return NormAffine(_norm(channels), ChannelAffine(torch.full((channels,), 1.5),
                                                         torch.full((channels,), 0.2)))

    return nn.Sequential(conv1, norm_affine(3), nn.ReLU(), conv2, norm_affine(4)).double()


def test_exact_adaptation_standardises_each_layer_under_the_layers_before_it() -> None:
    model = _two_layer_model()
    images = torch.randn(64, 2, 8, 8, dtype=torch.float64) * 3 + 1
    stats = estimate_statistics(model, 2, images, clip=1.0, noise_multiplier=None,
                                rng=np.random.default_rng(0), device=CPU)
    assert list(stats) == ["1.norm", "4.norm"]
    for name in stats:
        np.testing.assert_array_equal(statistics_of(model.get_submodule(name)).mean,
                                      stats[name].mean)
        # Under the adapted model every adapted layer's input is standardised: the
        # second layer's only because its statistics were taken after the first's.
        m = layer_moments(model, name, images, CPU).mean(0)
        np.testing.assert_allclose(m, 0.0, atol=1e-4)  # z**2 averages var / (var + eps)


def test_a_joint_estimate_would_miss_what_the_adapted_first_layer_does_to_the_second() -> None:
    images = torch.randn(64, 2, 8, 8, dtype=torch.float64) * 3 + 1
    joint = _two_layer_model()
    second = layer_moments(joint, "4.norm", images, CPU).mean(0)  # pretrained first layer
    estimate_statistics(joint, 2, images, 1.0, None, np.random.default_rng(0), CPU)
    assert np.abs(second).max() > 0.1  # the first layer's adaptation moved the second's input


def test_dp_adaptation_standardises_every_layer_to_within_its_noise() -> None:
    images = torch.randn(2000, 2, 8, 8, dtype=torch.float64) * 3 + 1
    clip = 20.0  # large enough that nothing is clipped: the error is the noise alone
    model = _two_layer_model()
    pretrained = {n: statistics_of(model.get_submodule(n)) for n in ("1.norm", "4.norm")}
    assert np.linalg.norm(layer_moments(model, "1.norm", images, CPU), axis=1).max() < \
        moment_bound(3, clip)
    exact = estimate_statistics(_two_layer_model(), 2, images, clip, None,
                                np.random.default_rng(0), CPU)
    noisy = estimate_statistics(model, 2, images, clip, 1.0, np.random.default_rng(1), CPU)
    for name, channels in (("1.norm", 3), ("4.norm", 4)):
        std = moment_bound(channels, clip) / 2000  # noise std of one mean moment
        assert np.linalg.norm(layer_moments(model, name, images, CPU), axis=1).max() < \
            moment_bound(channels, clip)
        # Under the adapted model each layer's input mean is off by its own noise only.
        m1 = layer_moments(model, name, images, CPU).mean(0)[:channels]
        scale = np.sqrt((pretrained[name].var + 1e-5) / (noisy[name].var + 1e-5))
        assert np.all(np.abs(m1) < 5 * std * scale)
        assert not np.array_equal(noisy[name].mean, exact[name].mean)
    first_sd = np.sqrt(pretrained["1.norm"].var + 1e-5)
    assert np.all(np.abs(noisy["1.norm"].mean - exact["1.norm"].mean)
                  < 5 * moment_bound(3, clip) / 2000 * first_sd)


def test_the_release_charges_every_layer_and_the_count_as_gaussians() -> None:
    for z, layers in ((40.0, 1), (25.0, 3)):
        charged = adaptation_release(z, layers)
        assert charged.noise_multiplier == pytest.approx(z / math.sqrt(layers + 1))
        assert epsilon_spent([charged], 1e-5) == pytest.approx(
            epsilon_spent([GaussianRelease(z, 1.0, layers + 1)], 1e-5), rel=1e-9)
        assert certify([charged], 1e-5).epsilon == pytest.approx(
            certify([GaussianRelease(z, 1.0, layers + 1)], 1e-5).epsilon, abs=0.02)


def test_the_variance_floor_keeps_a_noisy_variance_positive() -> None:
    reference = NormStatistics(np.zeros(2), np.ones(2))
    stats = statistics_from_moments(np.array([0.5, 0.0, 0.25, -5.0]), reference, 1e-5)
    assert stats.mean == pytest.approx([0.5 * math.sqrt(1 + 1e-5), 0.0])
    assert stats.var == pytest.approx([1 + 1e-5, 0.1 * (1 + 1e-5)])
