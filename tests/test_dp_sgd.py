"""FlatDPSGD: per-sample gradients against autograd, the clipped step against Opacus's."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from client.dp_sgd import FlatDPSGD, UnsupportedLayer, poisson_batch, supports
from common.model_surgery import ModelSpec, build_model
from tests.test_frozen_batchnorm import _per_sample_autograd, swapped_model


def _model(arch: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    return swapped_model(arch, 5)


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: n for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["resnet18", "lite0", "lite0-partial:2"])
def test_flat_per_sample_gradients_equal_autograd(arch: str) -> None:
    model, x = _model(arch)
    y = torch.randint(0, 3, (len(x),))
    expected = _per_sample_autograd(model, x, y)
    dp = FlatDPSGD(model, clip=1.0, noise_multiplier=0.0, expected_batch_size=len(x))
    dp.attach()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    dp.detach()
    flat = dp.per_sample_gradients()
    assert flat.shape == (len(x), sum(g[0].numel() for g in expected.values()))
    names = _names(model)
    start = 0
    for p in dp.params:
        got = flat[:, start:start + p.numel()].reshape(len(x), *p.shape)
        torch.testing.assert_close(got, expected[names[p]], atol=1e-10, rtol=1e-8)
        start += p.numel()
    assert {names[p] for p in dp.params} == set(expected) and len(expected) > 40


def test_clipped_step_equals_opacus_dp_optimizer() -> None:
    """With the noise off, the flat step is Opacus's DPOptimizer step, clipping included."""
    model, x = _model("lite0")
    y = torch.randint(0, 3, (len(x),))
    reference = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    clip = float(torch.linalg.vector_norm(torch.cat([p.grad_sample.flatten(1)
                                                     for p in ref_params], 1), dim=1).median())
    # As make_private sets it up: per-sample gradients of each sample's own loss,
    # the clipped sum divided by the expected batch size.
    opacus = DPOptimizer(torch.optim.SGD(ref_params, lr=1.0), noise_multiplier=0.0,
                         max_grad_norm=clip, expected_batch_size=7, loss_reduction="mean")
    assert opacus.pre_step()

    dp = FlatDPSGD(model, clip=clip, noise_multiplier=0.0, expected_batch_size=7)
    dp.attach()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    dp.detach()
    flat = dp.per_sample_gradients().clone()
    dp.clip_and_accumulate()
    dp.set_gradients(dp.noisy_gradient(torch.device("cpu")))
    names = _names(model)
    ref_names = {n.removeprefix("_module."): p for n, p in reference.named_parameters()}
    for p in dp.params:
        torch.testing.assert_close(p.grad, ref_names[names[p]].grad, atol=1e-12, rtol=1e-9)
    # The clip bites: some samples were scaled down, so this is not a plain sum.
    assert (torch.linalg.vector_norm(flat, dim=1) > clip * 1.01).any()


def test_a_batch_in_chunks_gives_the_same_step_as_in_one_piece() -> None:
    model, x = _model("lite0")
    y = torch.randint(0, 3, (len(x),))
    steps = []
    for chunks in ((slice(0, 5),), (slice(0, 2), slice(2, 5))):
        dp = FlatDPSGD(model, clip=0.05, noise_multiplier=0.0, expected_batch_size=4.0)
        dp.attach()
        for part in chunks:
            nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
            dp.clip_and_accumulate()
        dp.detach()
        steps.append(dp.noisy_gradient(torch.device("cpu")))
    torch.testing.assert_close(steps[0], steps[1], atol=1e-13, rtol=1e-10)
    with pytest.raises(RuntimeError, match="not accumulated"):
        dp.attach()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        dp.noisy_gradient(torch.device("cpu"))


def test_noise_has_the_planned_scale_and_an_empty_batch_still_steps() -> None:
    model = build_model(ModelSpec(num_classes=2, in_channels=1))
    dp = FlatDPSGD(model, clip=0.1, noise_multiplier=2.0, expected_batch_size=8.0)
    grad = dp.noisy_gradient(torch.device("cpu"))
    assert grad.shape == (dp.num_params,) and dp.num_params > 10_000
    expected_std = 2.0 * 0.1 / 8.0
    assert float(grad.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(grad.mean())) < 5 * expected_std / dp.num_params ** 0.5


def test_a_trainable_layer_without_a_rule_is_refused() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    model = nn.Sequential(nn.Linear(2, 2), Scale())
    assert not supports(model)
    with pytest.raises(UnsupportedLayer, match=r"1 \(Scale\)"):
        FlatDPSGD(model, clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    assert supports(nn.Sequential(nn.Linear(2, 2)))


def test_poisson_batch_includes_each_example_at_the_sample_rate() -> None:
    counts = torch.zeros(50)
    for _ in range(2000):
        counts[poisson_batch(50, 0.2, torch.device("cpu"))] += 1
    assert float(counts.mean()) == pytest.approx(400, rel=0.03)
    assert float(counts.min()) > 300 and float(counts.max()) < 500
