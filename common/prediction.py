"""Class probabilities of a model over a stack of images, in batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` in eval mode."""
    model.to(device).eval()
    out = [
        torch.softmax(model(images[i:i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))
