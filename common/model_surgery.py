"""Build the model a site fine-tunes: adapter, frozen backbone, trainable parts.

:func:`build_model` takes a pretrained backbone from :mod:`common.backbones`,
replaces every BatchNorm by frozen normalisation + trainable affine
(:mod:`common.frozen_batchnorm`; or, for ``full-gn``, by GroupNorm as Opacus's
``ModuleValidator.fix`` does), puts a new head for the task's classes on it,
puts a learnable 1x1 input adapter in front, and marks the parameters of the
chosen transfer mode as the only trainable ones.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.nn import functional as F

from common.backbones import Backbone, get_backbone
from common.frozen_batchnorm import ChannelAffine, replace_batchnorm
from common.transfer_mode import TransferMode

HEAD_INIT_SEED = 20261121


class InputAdapter(nn.Module):
    """Learnable 1x1 convolution from ``in_channels`` to the 3 channels a backbone expects.

    Starts as a grey-to-RGB copy: with one input channel every output channel is
    that channel; with three it is the identity; otherwise each output is the mean
    of the inputs.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.conv = nn.Conv2d(in_channels, 3, kernel_size=1, bias=True)
        with torch.no_grad():
            if in_channels == 3:
                self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            else:
                self.conv.weight.fill_(1.0 / in_channels)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class InputNormalize(nn.Module):
    """Fixed per-channel normalisation the pretrained weights expect."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SamePadding(nn.Module):
    """TensorFlow-style dynamic "same" padding for a convolution that follows it."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.dilation = conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(
            reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride),
            reversed(self.dilation), strict=True,
        ):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
        conv.dilation, conv.groups, conv.bias is not None,
    )
    plain.load_state_dict(conv.state_dict())
    return plain


def replace_same_padding_convs(model: nn.Module) -> None:
    """Split timm's ``Conv2dSame`` into padding + plain ``nn.Conv2d``.

    Opacus computes per-sample gradients of ``nn.Conv2d`` from the convolution's
    input; ``Conv2dSame`` pads inside its forward, so its captured input would be
    the unpadded one. After the split the padding is a separate, parameter-free step.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, Conv2dSame):
            setattr(model, name, nn.Sequential(SamePadding(child), _plain_conv(child)))
        else:
            replace_same_padding_convs(child)


def replace_batchnorm_with_groupnorm(model: nn.Module) -> int:
    """Replace every BatchNorm in ``model`` (in place) by a fresh GroupNorm.

    Opacus's usual recipe for DP training of a whole network
    (``ModuleValidator.fix``): ``gcd(32, C)`` groups, weight 1 and bias 0, the
    pretrained statistics and affine dropped. That fixer skips timm's
    ``BatchNormAct2d``, so this does it here and keeps the layer's dropout and
    activation (not in place) after the GroupNorm. Returns the number replaced.
    """
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            layers: list[nn.Module] = [nn.GroupNorm(math.gcd(32, channels), channels,
                                                    eps=child.eps)]
            layers += [m for m in (getattr(child, "drop", None), getattr(child, "act", None))
                       if m is not None and not isinstance(m, nn.Identity)]
            setattr(model, name, layers[0] if len(layers) == 1 else nn.Sequential(*layers))
            count += 1
        else:
            count += replace_batchnorm_with_groupnorm(child)
    return count


@dataclass(frozen=True)
class ModelSpec:
    """What model to build.

    Parameters
    ----------
    backbone : str (default: "efficientnet_lite0")
        Registry name from :mod:`common.backbones`.
    num_classes : int (default: 2)
        Classes of the task; the new head has this many outputs.
    in_channels : int (default: 1)
        Channels of the input images (1 for grey X-rays).
    mode : str (default: "bn+head")
        Transfer mode, see :class:`common.transfer_mode.TransferMode`.
    weights : Path or None (default: None)
        Local pretrained weights file; None uses the backbone's own source.
    """

    backbone: str = "efficientnet_lite0"
    num_classes: int = 2
    in_channels: int = 1
    mode: str = "bn+head"
    weights: Path | None = None


class FedShiftModel(nn.Module):
    """Input adapter, fixed input normalisation and the surgically changed backbone."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec, info: Backbone) -> None:
        super().__init__()
        self.adapter = InputAdapter(spec.in_channels)
        self.normalize = InputNormalize(info.mean, info.std)
        self.backbone = backbone
        self.head_name = f"backbone.{info.head_name}"
        self.stage_names = tuple(f"backbone.{s}" for s in info.stage_names)
        self.mode = TransferMode.parse(spec.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(self.adapter(x)))

    def trainable_names(self) -> list[str]:
        """Names of the parameters the transfer mode trains (what travels)."""
        return [name for name, p in self.named_parameters() if p.requires_grad]


@functools.lru_cache(maxsize=4)
def _pretrained(backbone: str, weights: Path | None) -> nn.Module:
    return get_backbone(backbone).load(weights).eval()


def _set_head(model: nn.Module, head_name: str, num_classes: int) -> None:
    parent_name, _, attr = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"expected a Linear head at {head_name}, found {type(old).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def build_model(spec: ModelSpec) -> FedShiftModel:
    """Build the model for ``spec``, with only the mode's parameters trainable.

    Every part that does not train is deterministic (pretrained, or seeded), so
    every site and the server hold the same frozen model.
    """
    if spec.num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {spec.num_classes}")
    info = get_backbone(spec.backbone)
    backbone = copy.deepcopy(_pretrained(spec.backbone, spec.weights))
    _set_head(backbone, info.head_name, spec.num_classes)
    model = FedShiftModel(backbone, spec, info)
    if model.mode.kind == "full-gn":
        replace_batchnorm_with_groupnorm(model.backbone)
    elif model.mode.kind != "full":
        replace_batchnorm(model.backbone)
    replace_same_padding_convs(model.backbone)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    apply_transfer_mode(model)
    return model


def _stage_modules(model: FedShiftModel, last: int) -> list[nn.Module]:
    return [model.get_submodule(n) for n in model.stage_names[len(model.stage_names) - last:]]


def apply_transfer_mode(model: FedShiftModel) -> None:
    """Set ``requires_grad`` so that only the mode's parameters train."""
    mode = model.mode
    if mode.stages > len(model.stage_names):
        raise ValueError(
            f"partial:{mode.stages} asks for more stages than the backbone has "
            f"({len(model.stage_names)})"
        )
    model.requires_grad_(mode.trains_everything)
    if mode.trains_everything:
        return
    head = model.get_submodule(model.head_name)
    if mode.trains_head:
        head.requires_grad_(True)
    if mode.trains_affine:
        model.adapter.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, ChannelAffine):
                module.requires_grad_(True)
    for stage in _stage_modules(model, mode.stages):
        stage.requires_grad_(True)


def param_groups(model: FedShiftModel, lr: float, stage_decay: float = 0.5) -> list[dict]:
    """Optimizer parameter groups for the model's transfer mode.

    ``partial:K`` uses discriminative learning rates: the convolutions of the j-th
    stage from the end train at ``lr * stage_decay**j``; everything else at ``lr``.
    """
    staged: list[dict] = []
    seen: set[int] = set()
    stages = _stage_modules(model, model.mode.stages)
    for j, stage in enumerate(reversed(stages), start=1):
        params = [
            p for m in stage.modules() if not isinstance(m, ChannelAffine)
            for p in m.parameters(recurse=False) if p.requires_grad
        ]
        seen.update(id(p) for p in params)
        if params:
            staged.append({"params": params, "lr": lr * stage_decay**j})
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [{"params": base, "lr": lr}, *staged]
