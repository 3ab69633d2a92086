"""Class probabilities or logits of a model over a stack of images, in batches, and
the calibrated predictions a site makes with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.operating_point import OperatingPoint, choose_operating_point


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


@dataclass(frozen=True)
class CalibratedPredictions:
    """A site's raw logits, calibrated posteriors and decisions on a split, and the point
    that made them."""

    logits: np.ndarray
    probs: np.ndarray
    decisions: np.ndarray
    point: OperatingPoint


def calibrated_predictions(model: nn.Module, validation_images: torch.Tensor,
                           validation_labels: torch.Tensor, images: torch.Tensor,
                           device: torch.device, target_sensitivity: float = 0.0
                           ) -> CalibratedPredictions:
    """``model`` on ``images`` as a site uses it: calibrated and decided at the site's
    operating point, both fitted on its own validation split (see
    :mod:`common.operating_point`; nothing leaves the site)."""
    point = choose_operating_point(predict_logits(model, validation_images, device),
                                   validation_labels.numpy(), target_sensitivity)
    logits = predict_logits(model, images, device)
    return CalibratedPredictions(logits, point.calibration.probs(logits), point.decide(logits),
                                 point)
