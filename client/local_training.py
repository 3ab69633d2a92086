"""Local fine-tuning at a site, under DP-SGD (Opacus) or without privacy.

The DP path uses Poisson sampling, per-sample clipping to ``clip`` and Gaussian
noise of ``noise_multiplier * clip`` (:mod:`client.dp_sgd` for the modes that
train only affines, adapter and head; Opacus's ``make_private`` otherwise);
Opacus's own accountant is not used: the caller charges the returned (noise
multiplier, sample rate, steps) to the site's privacy ledger.
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

from client.dp_sgd import FlatDPSGD, poisson_batch, supports
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
    non-DP runs see the same amount of data. Under DP, the modes that train some
    layers (``bn+head``, ``bn``, ``head``, ``partial:K``) train with
    :class:`client.dp_sgd.FlatDPSGD`; those that train every layer with Opacus's
    ``make_private`` and functorch.
    Both use Poisson sampling at :func:`poisson_sample_rate`; neither the sampling
    nor the noise is seeded: privacy amplification and the Gaussian mechanism both
    assume that randomness stays secret.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("no training examples at this site")
    if noise_multiplier is not None and not model.mode.allows_dp:
        raise ValueError(
            f"transfer mode {model.mode} keeps BatchNorm, which DP-SGD cannot train; "
            "use bn+head, bn, head or partial:K with DP, or turn DP off"
        )
    model.to(device).train()
    run = _Run(model, cfg, device)
    if noise_multiplier is None:
        _train_plain(run, images, labels)
    elif model.mode.trains_everything or not supports(model):
        _train_opacus(run, images, labels, noise_multiplier)
    else:
        _train_flat_dp(run, images, labels, noise_multiplier)
    model.eval()
    return TrainingOutcome(steps=run.steps, examples=run.loss_count,
                           mean_loss=run.loss_sum / max(run.loss_count, 1),
                           sample_rate=poisson_sample_rate(n, cfg.batch_size))


class _Run:
    """One round's optimizer, FedProx anchor and running tallies."""

    def __init__(self, model: FedShiftModel, cfg: LocalTrainingConfig,
                 device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = _optimizer(model, cfg)
        self.global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        self.steps, self.loss_sum, self.loss_count = 0, 0.0, 0

    def finish_step(self, loss_sum: float, count: int) -> None:
        self.optimizer.step()
        _proximal_step(self.model, self.global_params, self.optimizer, self.cfg.proximal_mu)
        self.loss_sum += loss_sum
        self.loss_count += count
        self.steps += 1


def _train_plain(run: _Run, images: torch.Tensor, labels: torch.Tensor) -> None:
    criterion = nn.CrossEntropyLoss()
    for _ in range(run.cfg.epochs):
        for index in torch.randperm(len(labels)).split(run.cfg.batch_size):
            x = images[index].to(run.device, non_blocking=True)
            y = labels[index].to(run.device, non_blocking=True)
            run.optimizer.zero_grad(set_to_none=True)
            loss = criterion(run.model(x), y)
            loss.backward()
            run.finish_step(float(loss.detach()) * len(y), len(y))


def _train_flat_dp(run: _Run, images: torch.Tensor, labels: torch.Tensor,
                   noise_multiplier: float) -> None:
    n = len(labels)
    sample_rate = poisson_sample_rate(n, run.cfg.batch_size)
    dp = FlatDPSGD(run.model, run.cfg.clip, noise_multiplier, sample_rate * n)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    dp.attach()
    try:
        for _ in range(steps_per_round(n, run.cfg)):
            index = poisson_batch(n, sample_rate, torch.device("cpu"))
            run.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            # A Poisson batch above the expected size goes through in chunks of at
            # most that size: the same clipped sum, and never more activations
            # than a non-private step holds (measured: 10 % above the expected
            # size in one piece cost 25 % more peak memory than non-DP).
            for chunk in index.split(run.cfg.batch_size):
                x = images[chunk].to(run.device, non_blocking=True)
                y = labels[chunk].to(run.device, non_blocking=True)
                loss = criterion(run.model(x), y)
                loss.backward()
                dp.clip_and_accumulate()
                loss_sum += float(loss.detach())
            dp.set_gradients(dp.noisy_gradient(run.device))
            run.finish_step(loss_sum, len(index))
    finally:
        dp.detach()


def _train_opacus(run: _Run, images: torch.Tensor, labels: torch.Tensor,
                  noise_multiplier: float) -> None:
    sample_rate = poisson_sample_rate(len(labels), run.cfg.batch_size)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG (torchcsprng) is off; noise comes
        # from torch's default generator, unseeded.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        net, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=run.model, optimizer=run.optimizer,
            data_loader=DataLoader(TensorDataset(images, labels),
                                   batch_size=run.cfg.batch_size),
            noise_multiplier=noise_multiplier, max_grad_norm=run.cfg.clip,
            poisson_sampling=True, grad_sample_mode=_grad_sample_mode(run.model),
        )
    if not math.isclose(loader.sample_rate, sample_rate):
        raise RuntimeError(
            f"Opacus samples at rate {loader.sample_rate}, the ledger would record "
            f"{sample_rate}; refusing to train with mismatched accounting"
        )
    run.optimizer = optimizer
    criterion = nn.CrossEntropyLoss()
    try:
        with warnings.catch_warnings():
            # The input does not require grad, so Opacus's full backward hooks fire on
            # output gradients only, which is all its grad samplers use.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(run.cfg.epochs):
                for x, y in loader:
                    x = x.to(run.device, non_blocking=True)
                    y = y.to(run.device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(net(x), y)
                    loss.backward()
                    run.finish_step(float(loss.detach()) * len(y), len(y))
    finally:
        net.remove_hooks()


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
