"""The backbone registry: real offline weights, torchvision weights, clear errors."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from skimage import data as skdata
from torch.nn import functional as F

from common.backbones import BackboneError, get_backbone, remap_lite0_key
from common.model_surgery import ModelSpec, build_model

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_default_weights_recognise_a_real_cat_photo() -> None:
    model = get_backbone("efficientnet_lite0").load(None).eval()
    photo = torch.from_numpy(np.ascontiguousarray(skdata.chelsea())).permute(2, 0, 1).float()
    x = F.interpolate(photo[None] / 255.0, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model((x - 0.5) / 0.5).softmax(dim=1)[0]
    assert int(probs.argmax()) in IMAGENET_CAT_CLASSES
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) > 0.8


@pytest.mark.parametrize(("key", "expected"), [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_bn0.running_mean", "bn1.running_mean"),
    ("_bn1.bias", "bn2.bias"),
    ("_fc.weight", "classifier.weight"),
    ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
    ("_blocks.0._bn2.weight", "blocks.0.0.bn2.weight"),
    ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
    ("_blocks.2._bn0.weight", "blocks.1.1.bn1.weight"),
    ("_blocks.3._project_conv.weight", "blocks.2.0.conv_pwl.weight"),
    ("_blocks.15._bn2.running_var", "blocks.6.0.bn3.running_var"),
])
def test_lite0_key_remap(key: str, expected: str) -> None:
    assert remap_lite0_key(key) == expected


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet1000'.*efficientnet_lite0"):
        build_model(ModelSpec(backbone="resnet1000"))


def test_torchvision_backbone_without_weights_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError, match=r"resnet18.*torch hub cache.*--weights PATH"):
        get_backbone("resnet18").load(None)


def test_torchvision_backbone_from_local_weights_file(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSpec(backbone="resnet18", weights=path))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight,
                               reference.layer1[0].conv1.weight)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match=r"nope\.pth does not exist"):
        get_backbone("resnet18").load(missing)
