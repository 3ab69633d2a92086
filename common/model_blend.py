"""A site's choice between the federated model, a model of its own, and a mix of the two.

A site that trains alone needs no privacy: nothing leaves it. So the honest
question "would this site do better alone?" compares the federated (DP) model
with a model the site trains on its own training split without noise. Both are
scored on the site's validation split, after the same calibration the site
uses for its decisions (:mod:`common.operating_point`): the calibrated log loss
of ``w * log p_federated + (1 - w) * log p_local`` for each weight ``w`` on a
small grid. A mix replaces the federated model only where its gain is clear: the
mean of the per-image differences in loss exceeds :data:`CLEAR_GAIN` standard
errors (one-sided, about 95 %), so a small validation split does not swap a good
federated model for noise. Nothing here is released.

- :func:`choose_blend` makes the choice from validation logits (pure NumPy).
- :class:`BlendedModel` is the chosen mix as one model, so calibration and the
  operating point apply to it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.operating_point import fit_calibration

WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
"""Weights of the federated model tried; 1 is the federated model alone."""
CLEAR_GAIN = 1.645
"""Standard errors by which a mix's mean loss must beat the federated model's."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def blend_logits(federated: np.ndarray, local: np.ndarray, weight: float) -> np.ndarray:
    """Log-probabilities of the mix: ``weight`` on the federated model's log-softmax."""
    return weight * _log_softmax(federated) + (1.0 - weight) * _log_softmax(local)


def calibrated_log_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's negative log-likelihood of its label after fitting the site's
    calibration (temperature and bias) to these logits."""
    log_probs = fit_calibration(logits, labels).log_probs(logits)
    return -log_probs[np.arange(len(labels)), labels]


def _clear_gain(federated: np.ndarray, other: np.ndarray) -> bool:
    """Whether ``other``'s per-image losses beat the federated ones by more than
    :data:`CLEAR_GAIN` standard errors of the mean paired difference."""
    gain = federated - other
    if len(gain) < 2:
        return False
    return bool(gain.mean() > CLEAR_GAIN * gain.std(ddof=1) / np.sqrt(len(gain)))


@dataclass(frozen=True)
class BlendChoice:
    """What a site found on its validation split, and the mix it decides with.

    Parameters
    ----------
    weight : float
        Weight of the federated model in the chosen mix (1: federated alone,
        0: the site's own model alone).
    losses : dict of float to float
        Calibrated validation log loss of each weight tried.
    clear_gains : tuple of float
        The weights whose loss beats the federated model's clearly (see
        :data:`CLEAR_GAIN`); the choice is the best of these, else 1.
    validation_size : int
        Images in the validation split the choice was made on.
    """

    weight: float
    losses: dict[float, float]
    clear_gains: tuple[float, ...]
    validation_size: int

    @property
    def federated_loss(self) -> float:
        return self.losses[1.0]

    @property
    def local_loss(self) -> float:
        return self.losses[0.0]

    @property
    def alone_is_better(self) -> bool:
        """Whether the site's own model clearly beat the federated one on its validation
        split."""
        return 0.0 in self.clear_gains

    def summary(self, site: str, mixing: bool) -> str:
        """One line for the site's log; ``mixing``: whether the site decides with the mix."""
        head = (f"{site}: on its validation split ({self.validation_size} images) the "
                f"federated model's calibrated log loss is {self.federated_loss:.3f}, its "
                f"own model's {self.local_loss:.3f}")
        if self.weight == 1.0:
            return f"{head}; it decides with the federated model"
        verdict = ("alone it would do clearly better there" if self.alone_is_better
                   else "a mix does clearly better there than the federated model")
        mix = f"{self.weight:.0%} federated / {1 - self.weight:.0%} own model"
        if mixing:
            return (f"{head}: {verdict}, so it decides with {mix} (loss "
                    f"{self.losses[self.weight]:.3f}); nothing about this is released")
        return (f"{head}: {verdict} (best: {mix}, loss {self.losses[self.weight]:.3f}). It "
                "still decides with the federated model: check on images it will see "
                "before setting [operating_point] decide_with_mix = true")

    def to_dict(self) -> dict[str, object]:
        return {"weight": self.weight, "federated_loss": self.federated_loss,
                "local_loss": self.local_loss, "chosen_loss": self.losses[self.weight],
                "alone_is_better": self.alone_is_better,
                "clear_gains": list(self.clear_gains),
                "validation_size": self.validation_size}


def choose_blend(federated: np.ndarray, local: np.ndarray, labels: np.ndarray,
                 weights: tuple[float, ...] = WEIGHTS) -> BlendChoice:
    """The mix of federated and local logits with the lowest calibrated validation loss.

    Parameters
    ----------
    federated, local : ndarray (N, C)
        The two models' logits on the site's validation split.
    labels : ndarray (N,)
        The validation labels.
    weights : tuple of float (default: :data:`WEIGHTS`)
        Federated weights to try; must hold 1 and 0.
    """
    if federated.shape != local.shape or len(federated) != len(labels):
        raise ValueError(f"federated logits {federated.shape}, local logits {local.shape} "
                         f"and {len(labels)} labels must describe the same images")
    if 1.0 not in weights or 0.0 not in weights:
        raise ValueError(f"weights must include 1 (federated) and 0 (local), got {weights}")
    if len(labels) == 0:
        return BlendChoice(1.0, {w: float("nan") for w in weights}, (), 0)
    per_image = {w: calibrated_log_losses(blend_logits(federated, local, w), labels)
                 for w in weights}
    clear = tuple(w for w in weights if w != 1.0 and _clear_gain(per_image[1.0], per_image[w]))
    losses = {w: float(loss.mean()) for w, loss in per_image.items()}
    best = min(clear, key=lambda w: losses[w], default=1.0)
    return BlendChoice(best, losses, clear, len(labels))


class BlendedModel(nn.Module):
    """``weight * log_softmax(federated) + (1 - weight) * log_softmax(local)`` as a model."""

    def __init__(self, federated: nn.Module, local: nn.Module, weight: float) -> None:
        super().__init__()
        self.federated, self.local, self.weight = federated, local, weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mixed = self.weight * torch.log_softmax(self.federated(images), dim=1)
        if self.weight < 1.0:
            mixed = mixed + (1.0 - self.weight) * torch.log_softmax(self.local(images), dim=1)
        return mixed
