"""Class probabilities or logits of a model over a stack of images, in batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def _outputs(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int
             ) -> torch.Tensor:
    """(N, C) float32 outputs on the CPU; an empty stack still gives (0, C)."""
    model.to(device).eval()
    out = [model(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, max(len(images), 1), batch_size)]
    return torch.cat(out)


def predict_probs(model: nn.Module, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` in eval mode."""
    if len(images) == 0:
        return np.zeros((0, 0))
    return torch.softmax(_outputs(model, images, device, batch_size), dim=1).numpy()


def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """Logits (N, C) of ``model`` in eval mode, as float64."""
    return _outputs(model, images, device, batch_size).double().numpy()
