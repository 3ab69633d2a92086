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

Before bounding, each image's block is centred on a public per-class centre that
the server sends (its pooled estimate from earlier rounds; zero at first): the
bound then limits deviations rather than the raw values, and the noisy class counts
that turn sums into means barely matter.

Each centred feature ``v`` is bounded by a *soft* clip, ``v / (1 + |v| / b)`` with
``b = clip / sqrt(features)`` (:func:`soft_clip`): strictly increasing in ``v`` and
below ``b`` in size, so the block ``u`` has norm below ``clip`` as a hard clip to
norm ``clip`` guaranteed, but a larger deviation always releases a larger value. A
hard clip released the same value for every deviation beyond ``clip`` (about 0.2
per feature at the default clip), so moderate and strong shifts looked alike; the
soft clip compresses them (a deviation of ``b`` releases ``b / 2``, of ``3 b``
releases ``3 b / 4``) without making them equal. One more value ``|u|^2 / clip``
is appended so that the receiver can tell the spread of the per-image values (the
sampling noise of their mean) from their sum. A block's norm is then at most
``sqrt(2) * clip`` and an image's whole vector at most ``clip * sqrt(2 * layers)``,
exactly the bound of the hard clip: the sensitivity of the per-class sums released
by :func:`common.private_summaries.noisy_class_sums`, hence their noise and their
ledger charge, are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.frozen_batchnorm import FrozenNorm

FEATURES = ("offset", "spread")


@dataclass(frozen=True)
class MomentLayout:
    """Which layers are summarised, in release order, and how a block is bounded.

    Attributes
    ----------
    layer_names : tuple[str, ...]
        Module names of the summarised normalisation layers.
    clip : float
        Norm bound of a layer's (centred, softly clipped) feature block.
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


def soft_clip(values: np.ndarray, clip: float) -> np.ndarray:
    """Centred features bounded per value by ``b = clip / sqrt(features)``, softly.

    ``v / (1 + |v| / b)`` over the last axis (the features of one block): odd,
    strictly increasing, equal to ``v`` to first order near 0 and below ``b`` in
    size, so a block's norm stays below ``clip``.
    """
    bound = clip / math.sqrt(values.shape[-1])
    return values / (1.0 + np.abs(values) / bound)


def bounded_blocks(centred: np.ndarray, clip: float) -> np.ndarray:
    """(N, layers, features + 1) release blocks from (N, layers, features) centred features.

    Each block is :func:`soft_clip` of its features followed by ``|u|^2 / clip``.
    """
    u = soft_clip(centred, clip)
    return np.concatenate([u, (u**2).sum(axis=-1, keepdims=True) / clip], axis=-1)


def image_moments(model: nn.Module, layout: MomentLayout, images: torch.Tensor,
                  labels: np.ndarray, centre: np.ndarray, device: torch.device
                  ) -> np.ndarray:
    """(N, layers, width) centred, bounded per-image blocks, ready to sum per class.

    ``centre`` has :meth:`MomentLayout.centre_shape`; image ``i`` is centred on
    ``centre[labels[i]]``.
    """
    features = layer_features(model, layout, images, device)
    return bounded_blocks(features - centre[labels], layout.clip)
