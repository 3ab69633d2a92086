"""Transfer modes train exactly their parameters; the input adapter starts as a grey copy."""

from __future__ import annotations

import pytest
import torch

from common.federation_config import ConfigError, FederationConfig
from common.frozen_batchnorm import ChannelAffine
from common.model_surgery import ModelSpec, build_model, param_groups
from common.transfer_mode import TransferMode


def _affine_names(model: torch.nn.Module) -> set[str]:
    return {f"{mod_name}.{p}" for mod_name, m in model.named_modules()
            if isinstance(m, ChannelAffine) for p in ("weight", "bias")}


def test_bn_head_trains_affines_adapter_and_head_only() -> None:
    model = build_model(ModelSpec())
    trainable = set(model.trainable_names())
    expected = _affine_names(model) | {"adapter.conv.weight", "adapter.conv.bias",
                                       "backbone.classifier.weight", "backbone.classifier.bias"}
    assert trainable == expected
    assert len(_affine_names(model)) == 2 * 49


def test_full_gn_swaps_every_batchnorm_for_groupnorm_and_trains_everything() -> None:
    model = build_model(ModelSpec(mode="full-gn"))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm | ChannelAffine)
                   for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(groups) == 49
    assert all(g.num_channels % g.num_groups == 0 and g.num_groups <= 32 for g in groups)
    assert all(p.requires_grad for p in model.parameters())
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    FederationConfig(mode="full-gn", shift=False)
    with pytest.raises(ConfigError, match="shift"):
        FederationConfig(mode="full-gn")


def test_head_mode_is_a_linear_probe() -> None:
    model = build_model(ModelSpec(mode="head"))
    assert model.trainable_names() == ["backbone.classifier.weight", "backbone.classifier.bias"]


def test_bn_mode_leaves_the_seeded_head_frozen_and_identical() -> None:
    a, b = build_model(ModelSpec(mode="bn")), build_model(ModelSpec(mode="bn"))
    assert not any("classifier" in n for n in a.trainable_names())
    torch.testing.assert_close(a.backbone.classifier.weight, b.backbone.classifier.weight)


def test_partial_trains_last_stages_with_discriminative_rates() -> None:
    model = build_model(ModelSpec(mode="partial:2"))
    names = set(model.trainable_names())
    assert "backbone.conv_head.weight" in names
    assert any(n.startswith("backbone.blocks.6.") and "conv" in n for n in names)
    assert not any(n.startswith("backbone.blocks.5.") and "conv" in n for n in names)
    groups = param_groups(model, lr=0.1, stage_decay=0.5)
    assert [g["lr"] for g in groups] == [0.1, 0.05, 0.025]
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len(names)


def test_full_mode_is_refused_under_dp_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"keeps BatchNorm.*DP-SGD cannot train"):
        FederationConfig(mode="full", dp=True)
    FederationConfig(mode="full", dp=False)


@pytest.mark.parametrize("text", ["bn+tail", "partial:0", "partial:x"])
def test_bad_transfer_mode_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="transfer mode"):
        TransferMode.parse(text)


def test_adapter_starts_as_grey_to_rgb_copy() -> None:
    model = build_model(ModelSpec(in_channels=1))
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        via_adapter = model(grey)
        direct = model.backbone(model.normalize(grey.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(via_adapter, direct)
