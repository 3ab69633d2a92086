"""Per-image moments of what every normalisation layer sees, ready for a DP release.

For each :class:`~common.frozen_batchnorm.FrozenNorm` layer of a model, and a
fixed public choice of up to ``channels`` of its channels, one image's statistics
are the spatial mean ``m`` and the centred second moment ``(s - 1) / sqrt(2)`` of
its input standardised by the layer's frozen (pretrained) statistics, so that the
pretrained data would give values near 0. The layer's block ``u`` (length
``2 * channels``) is clipped to norm ``clip``, and one more value ``|u|^2 / clip``
is appended so that the receiver can tell the spread of the per-image statistics
(the sampling noise of their mean) from their sum. A block's norm is then at most
``sqrt(2) * clip`` and an image's whole vector at most ``clip * sqrt(2 * layers)``:
the sensitivity of the per-class sums released by
:func:`common.private_summaries.noisy_class_sums`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.frozen_batchnorm import FrozenNorm
from common.private_summaries import clip_rows

CHANNEL_CHOICE_SEED = 20261121


@dataclass(frozen=True)
class MomentLayout:
    """Which layers and channels are summarised, in release order.

    Attributes
    ----------
    layer_names : tuple[str, ...]
        Module names of the normalisation layers.
    channels : tuple[tuple[int, ...], ...]
        Chosen channel indices per layer.
    width : int
        Values per layer block (``2 * channels + 1``, padded to the widest layer).
    clip : float
        Norm bound of a layer's moment block.
    """

    layer_names: tuple[str, ...]
    channels: tuple[tuple[int, ...], ...]
    width: int
    clip: float

    @property
    def sensitivity(self) -> float:
        """Bound on the norm of one image's whole vector."""
        return self.clip * math.sqrt(2 * len(self.layer_names))


def norm_layers(model: nn.Module) -> list[tuple[str, FrozenNorm]]:
    """The model's frozen-statistics normalisation layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenNorm)]


def moment_layout(model: nn.Module, channels: int, clip: float) -> MomentLayout:
    """The layout every participant derives identically from the same model."""
    layers = norm_layers(model)
    if not layers:
        raise ValueError("the model has no frozen normalisation layers to summarise")
    gen = torch.Generator().manual_seed(CHANNEL_CHOICE_SEED)
    chosen = []
    for _, layer in layers:
        order = torch.randperm(layer.num_features, generator=gen)
        chosen.append(tuple(sorted(order[:channels].tolist())))
    width = 2 * max(len(c) for c in chosen) + 1
    return MomentLayout(tuple(n for n, _ in layers), tuple(chosen), width, clip)


@torch.no_grad()
def image_moments(model: nn.Module, layout: MomentLayout, images: torch.Tensor,
                  device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(N, layers, width) clipped per-image moment blocks of ``images``."""
    modules = dict(model.named_modules())
    blocks: list[list[torch.Tensor]] = [[] for _ in layout.layer_names]
    hooks = []
    for j, (name, chans) in enumerate(zip(layout.layer_names, layout.channels, strict=True)):
        layer = modules[name]
        index = torch.tensor(chans, dtype=torch.long)

        def hook(mod: FrozenNorm, inputs: tuple[torch.Tensor, ...], j: int = j,
                 index: torch.Tensor = index) -> None:
            x = inputs[0].index_select(1, index.to(inputs[0].device)).float()
            mean = mod.mean[index.to(mod.mean.device)].view(1, -1, 1, 1)
            var = mod.var[index.to(mod.var.device)].view(1, -1, 1, 1)
            z = (x - mean) * torch.rsqrt(var + mod.eps)
            m = z.mean(dim=(2, 3))
            s = (z * z).mean(dim=(2, 3))
            blocks[j].append(torch.cat([m, (s - 1.0) / math.sqrt(2.0)], dim=1).cpu())

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        model.to(device).eval()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    out = np.zeros((len(images), len(layout.layer_names), layout.width))
    for j, parts in enumerate(blocks):
        u = clip_rows(torch.cat(parts).double().numpy(), layout.clip) if parts else None
        if u is None:
            continue
        out[:, j, :u.shape[1]] = u
        out[:, j, -1] = (u**2).sum(axis=1) / layout.clip
    return out
