"""Per-image summaries of what the model's normalisation layers see, ready for a DP release.

For a fixed, evenly spaced choice of the model's
:class:`~common.frozen_batchnorm.FrozenNorm` layers, one image's statistics per
layer are two averages over all of the layer's channels of its input standardised
by the layer's frozen (pretrained) statistics:

* ``offset``: the mean over channels of the squared spatial mean (how far the
  image's channel means sit from the pretrained ones);
* ``spread``: the mean over channels of the spatial variance, minus 1 (how much
  more or less the activations vary than on the pretrained data).

A scanner or protocol change moves both in most layers at once, so two numbers per
layer carry it; averaging over channels keeps their per-image noise small, and few
released dimensions keep the DP noise needed per dimension small.

Before clipping, each image's block is centred on a public per-class centre that
the server sends (its pooled estimate from earlier rounds; zero at first): clipping
then bounds deviations rather than the raw values, and the noisy class counts that
turn sums into means barely matter. The block ``u`` is clipped to norm ``clip`` and
one more value ``|u|^2 / clip`` is appended so that the receiver can tell the
spread of the per-image values (the sampling noise of their mean) from their sum.
A block's norm is then at most ``sqrt(2) * clip`` and an image's whole vector at
most ``clip * sqrt(2 * layers)``: the sensitivity of the per-class sums released by
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

FEATURES = ("offset", "spread")


@dataclass(frozen=True)
class MomentLayout:
    """Which layers are summarised, in release order, and how a block is bounded.

    Attributes
    ----------
    layer_names : tuple[str, ...]
        Module names of the summarised normalisation layers.
    clip : float
        Norm bound of a layer's (centred) feature block.
    """

    layer_names: tuple[str, ...]
    clip: float

    @property
    def width(self) -> int:
        """Values per layer block: the features, then ``|u|^2 / clip``."""
        return len(FEATURES) + 1

    @property
    def sensitivity(self) -> float:
        """Bound on the norm of one image's whole vector."""
        return self.clip * math.sqrt(2 * len(self.layer_names))

    def centre_shape(self, num_classes: int) -> tuple[int, int, int]:
        """Shape of the per-class centre: (classes, layers, features)."""
        return num_classes, len(self.layer_names), len(FEATURES)


def norm_layers(model: nn.Module) -> list[tuple[str, FrozenNorm]]:
    """The model's frozen-statistics normalisation layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FrozenNorm)]


def moment_layout(model: nn.Module, layers: int, clip: float) -> MomentLayout:
    """The layout every participant derives identically from the same model.

    ``layers`` normalisation layers evenly spaced from the first to the last (all
    of them when the model has fewer).
    """
    found = norm_layers(model)
    if not found:
        raise ValueError("the model has no frozen normalisation layers to summarise")
    picks = sorted({round(i) for i in np.linspace(0, len(found) - 1, min(layers, len(found)))})
    return MomentLayout(tuple(found[i][0] for i in picks), clip)


@torch.no_grad()
def layer_features(model: nn.Module, layout: MomentLayout, images: torch.Tensor,
                   device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(N, layers, features) uncentred, unclipped per-image features of ``images``."""
    modules = dict(model.named_modules())
    rows: list[list[torch.Tensor]] = [[] for _ in layout.layer_names]
    hooks = []
    for j, name in enumerate(layout.layer_names):
        def hook(mod: FrozenNorm, inputs: tuple[torch.Tensor, ...], j: int = j) -> None:
            x = inputs[0].float()
            z = (x - mod.mean.view(1, -1, 1, 1)) * torch.rsqrt(mod.var.view(1, -1, 1, 1) + mod.eps)
            mean = z.mean(dim=(2, 3))
            var = z.var(dim=(2, 3), unbiased=False)
            rows[j].append(torch.stack([(mean**2).mean(1), var.mean(1) - 1.0], dim=1).cpu())

        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        model.to(device).eval()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    if not len(images):
        return np.zeros((0, len(layout.layer_names), len(FEATURES)))
    return torch.stack([torch.cat(r) for r in rows], dim=1).double().numpy()


def image_moments(model: nn.Module, layout: MomentLayout, images: torch.Tensor,
                  labels: np.ndarray, centre: np.ndarray, device: torch.device
                  ) -> np.ndarray:
    """(N, layers, width) centred, clipped per-image blocks, ready to sum per class.

    ``centre`` has :meth:`MomentLayout.centre_shape`; image ``i`` is centred on
    ``centre[labels[i]]``.
    """
    features = layer_features(model, layout, images, device)
    u = features - centre[labels]
    out = np.zeros((len(images), len(layout.layer_names), layout.width))
    for j in range(len(layout.layer_names)):
        block = clip_rows(u[:, j, :], layout.clip)
        out[:, j, :-1] = block
        out[:, j, -1] = (block**2).sum(axis=1) / layout.clip
    return out
