"""Local fine-tuning at a site, under DP-SGD (Opacus) or without privacy.

The DP path uses Poisson sampling, per-sample clipping to ``clip`` and Gaussian
noise of ``noise_multiplier * clip``; Opacus's own accountant is not used: the
caller charges the returned (noise multiplier, sample rate, steps) to the site's
privacy ledger.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.model_surgery import FedShiftModel, param_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Hyper-parameters of one round of local training.

    Parameters
    ----------
    epochs : int (default: 1)
        Local epochs per round (an epoch is ``1 / sample_rate`` steps).
    batch_size : int (default: 128)
        Expected batch size (Poisson sampling under DP).
    lr : float (default: 0.5)
        Learning rate of the head and scale/shift parameters.
    optimizer : str (default: "sgd")
        ``sgd`` (with momentum 0.9) or ``adam``.
    clip : float (default: 0.1)
        Per-sample gradient norm bound under DP.
    proximal_mu : float (default: 0.0)
        FedProx proximal weight; applied as a decoupled step towards the global
        parameters after each (private) update, so it costs no privacy.
    stage_decay : float (default: 0.5)
        Learning-rate factor per stage for ``partial:K``.
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.5
    optimizer: str = "sgd"
    clip: float = 0.1
    proximal_mu: float = 0.0
    stage_decay: float = 0.5


@dataclass(frozen=True)
class TrainingOutcome:
    """What one round of local training did."""

    steps: int
    examples: int
    mean_loss: float
    sample_rate: float


def _optimizer(model: FedShiftModel, cfg: LocalTrainingConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.stage_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adam or sgd")


def _grad_sample_mode(model: FedShiftModel) -> str:
    """How Opacus computes per-sample gradients: its registered hooks for the
    scale/shift and head; functorch (vmap) when every layer trains, where the hooks'
    unfolded depthwise convolutions are about 3.5x slower on CPU (measured on
    efficientnet_lite0, batch 32, 64 px)."""
    return "functorch" if model.mode.trains_everything else "hooks"


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in an epoch; Opacus's Poisson loader samples each example at 1 / this rate."""
    return max(1, math.ceil(num_examples / batch_size))


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Probability with which each example joins a batch under DP (Opacus's rule)."""
    return 1.0 / batches_per_epoch(num_examples, batch_size)


def steps_per_round(num_examples: int, cfg: LocalTrainingConfig) -> int:
    """Optimizer steps one round takes, DP or not."""
    return cfg.epochs * batches_per_epoch(num_examples, cfg.batch_size)


def train_locally(
    model: FedShiftModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: LocalTrainingConfig,
    noise_multiplier: float | None,
    device: torch.device,
) -> TrainingOutcome:
    """Train ``model`` in place for one round; DP when ``noise_multiplier`` is given.

    The number of steps is :func:`steps_per_round` in both modes, so DP and
    non-DP runs see the same amount of data. Under DP neither the Poisson sampling
    nor the noise is seeded: privacy amplification and the Gaussian mechanism both
    assume that randomness stays secret.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("no training examples at this site")
    model.to(device).train()
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, cfg)
    dataset = TensorDataset(images, labels)
    sample_rate = poisson_sample_rate(n, cfg.batch_size)
    criterion = nn.CrossEntropyLoss()
    if noise_multiplier is None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
        net: nn.Module = model
    else:
        if not model.mode.allows_dp:
            raise ValueError(
                f"transfer mode {model.mode} keeps BatchNorm, which DP-SGD cannot train; "
                "use bn+head, bn, head or partial:K with DP, or turn DP off"
            )
        with warnings.catch_warnings():
            # Opacus warns that its secure RNG (torchcsprng) is off; noise comes
            # from torch's default generator, unseeded.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            net, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer,
                data_loader=DataLoader(dataset, batch_size=cfg.batch_size),
                noise_multiplier=noise_multiplier, max_grad_norm=cfg.clip, poisson_sampling=True,
                grad_sample_mode=_grad_sample_mode(model),
            )
        if not math.isclose(loader.sample_rate, sample_rate):
            raise RuntimeError(
                f"Opacus samples at rate {loader.sample_rate}, the ledger would record "
                f"{sample_rate}; refusing to train with mismatched accounting"
            )
    steps, loss_sum, loss_count = 0, 0.0, 0
    with warnings.catch_warnings():
        # The input does not require grad, so Opacus's full backward hooks fire on
        # output gradients only, which is all its grad samplers use.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(cfg.epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(net(x), y)
                loss.backward()
                loss_sum += float(loss.detach()) * len(y)
                loss_count += len(y)
                optimizer.step()
                _proximal_step(model, global_params, optimizer, cfg.proximal_mu)
                steps += 1
    if net is not model:
        net.remove_hooks()
    model.eval()
    return TrainingOutcome(steps=steps, examples=loss_count,
                           mean_loss=loss_sum / max(loss_count, 1), sample_rate=sample_rate)


@torch.no_grad()
def _proximal_step(
    model: FedShiftModel, global_params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer, mu: float,
) -> None:
    if mu <= 0:
        return
    lr = optimizer.param_groups[0]["lr"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(trainable, global_params, strict=True):
        p.sub_(lr * mu * (p - g))
