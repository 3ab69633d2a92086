"""BatchNorm swapped for frozen normalisation + affine: same outputs, exact per-sample grads."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from opacus import GradSampleModule
from timm.layers import BatchNormAct2d
from torch import nn

from common.frozen_batchnorm import ChannelAffine, NormAffine, replace_batchnorm
from common.model_surgery import ModelSpec, _pretrained, build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))


def test_swapped_resnet_equals_eval_batchnorm() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    _randomise_bn(model)
    swapped = copy.deepcopy(model)
    assert replace_batchnorm(swapped) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in swapped.modules())
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), atol=1e-5, rtol=1e-5)


def test_swapped_lite0_with_real_weights_equals_eval_batchnorm() -> None:
    reference = _pretrained("efficientnet_lite0", None)
    swapped = copy.deepcopy(reference)
    assert replace_batchnorm(swapped) == 49
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), reference(x), atol=1e-4, rtol=1e-4)


def test_timm_batchnorm_act_keeps_its_activation() -> None:
    bn = BatchNormAct2d(6, act_layer=nn.ReLU6).eval()
    _randomise_bn(nn.Sequential(bn))
    swapped = replace_batchnorm_module(bn)
    assert isinstance(swapped.act, nn.ReLU6) and not swapped.act.inplace
    x = torch.randn(2, 6, 5, 5) * 3
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), bn(x), atol=1e-6, rtol=1e-6)


def replace_batchnorm_module(bn: nn.Module) -> NormAffine:
    holder = nn.Sequential(bn)
    replace_batchnorm(holder)
    return holder[0]


def _per_sample_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    grads: dict[str, list[torch.Tensor]] = {}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for n, p in params.items():
            grads.setdefault(n, []).append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def swapped_model(arch: str, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """A model with BatchNorm swapped and only affines and head (or the ``arch``'s
    mode) trainable, in train mode and double precision, and a batch for it.

    ``arch``: ``resnet18`` (residual blocks do `out += identity` right after a
    BatchNorm: the case that needs the wrapper to return a fresh tensor) or
    ``lite0`` with an optional ``-MODE`` (``partial:2`` trains the depthwise
    "same"-padded convolutions of the last block).
    """
    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=3).eval()
        _randomise_bn(model)
        replace_batchnorm(model)
        for m in model.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, ChannelAffine):
                m.requires_grad_(True)
        model.fc.requires_grad_(True)
        x = torch.randn(batch, 3, 32, 32)
    else:
        mode = arch.partition("-")[2] or "bn+head"
        model = build_model(ModelSpec(num_classes=3, in_channels=1, mode=mode))
        model.backbone.drop_rate = 0.0  # deterministic forward in train mode
        x = torch.rand(batch, 1, 32, 32)
    # Opacus captures activations in train mode only; frozen norms ignore the mode.
    # Double precision, so that any difference is the formula's, not rounding's.
    return model.train().double(), x.double()


@pytest.mark.parametrize("arch", ["resnet18", "lite0", "lite0-partial:2", "lite0-full-gn"])
def test_per_sample_gradients_equal_autograd(arch: str) -> None:
    torch.manual_seed(1)
    model, x = swapped_model(arch, 4)
    y = torch.randint(0, 3, (len(x),))
    expected = _per_sample_autograd(model, x, y)
    # full-gn trains every layer; local training computes its per-sample
    # gradients with functorch, the rest with Opacus's registered hooks.
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum",
                           force_functorch=arch.endswith("full-gn"))
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    checked = 0
    for name, p in gsm.named_parameters():
        if not p.requires_grad:
            continue
        key = name.removeprefix("_module.")
        torch.testing.assert_close(p.grad_sample, expected[key], atol=1e-10, rtol=1e-8)
        checked += 1
    assert checked == len(expected) > 40


def test_channel_affine_backward_equals_autograd_of_the_plain_expression() -> None:
    """The affine's own backward (and the per-sample gradients it hands to a sink)
    against autograd through ``addcmul``, in double precision."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    layer = ChannelAffine(torch.randn(3, generator=gen), torch.randn(3, generator=gen)).double()
    received: list[dict[nn.Parameter, torch.Tensor]] = []
    layer.per_sample_sink = received.append
    xin = x.clone().requires_grad_(True)
    (layer(xin) * g).sum().backward()

    def plain(xs: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = xs.clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        (torch.addcmul(b.view(1, -1, 1, 1), xs, w.view(1, -1, 1, 1)) * gs).sum().backward()
        return xs.grad, w.grad, b.grad

    gx, gw, gb = plain(x, g)
    torch.testing.assert_close(xin.grad, gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.weight.grad, gw, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.bias.grad, gb, atol=1e-12, rtol=1e-12)
    assert len(received) == 1 and set(received[0]) == {layer.weight, layer.bias}
    for n in range(len(x)):
        _, gw_n, gb_n = plain(x[n:n + 1], g[n:n + 1])
        torch.testing.assert_close(received[0][layer.weight][n], gw_n, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(received[0][layer.bias][n], gb_n, atol=1e-12, rtol=1e-12)


def test_frozen_affine_parameters_get_no_gradient_and_reach_no_sink() -> None:
    layer = ChannelAffine(torch.ones(2), torch.zeros(2)).requires_grad_(False)
    received: list[dict[nn.Parameter, torch.Tensor]] = []
    layer.per_sample_sink = received.append
    x = torch.randn(3, 2, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and received == []
    torch.testing.assert_close(x.grad, torch.ones_like(x))
