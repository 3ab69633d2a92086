"""BatchNorm replaced by frozen-statistics normalisation plus a trainable affine.

Opacus cannot train BatchNorm (a sample's output depends on the rest of its batch)
and refuses trainable modules that hold buffers. :func:`replace_batchnorm` swaps
every BatchNorm for a :class:`NormAffine`: a :class:`FrozenNorm` (statistics as
buffers, nothing trainable) followed by a :class:`ChannelAffine` (the per-channel
scale and shift, parameters only), with an Opacus grad sampler registered for the
affine so that per-sample gradients come from tensors the backward pass already has;
the affine's own backward forms them too, for :mod:`client.dp_sgd`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast over an (N, C, ...) tensor."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class FrozenNorm(nn.Module):
    """Normalisation by fixed statistics: ``(x - mean) / sqrt(var + eps)``.

    Parameters
    ----------
    mean : torch.Tensor
        Per-channel mean, stored as a buffer.
    var : torch.Tensor
        Per-channel variance, stored as a buffer.
    eps : float (default: 1e-5)
        Added to the variance before the square root.
    """

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("var", var.detach().clone().float())

    @property
    def num_features(self) -> int:
        """Number of channels normalised."""
        return self.mean.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv_std = torch.rsqrt(self.var + self.eps)
        scale = _channel_view(inv_std, x.ndim).to(x.dtype)
        shift = _channel_view(-self.mean * inv_std, x.ndim).to(x.dtype)
        return torch.addcmul(shift, x, scale)


PerSampleSink = Callable[[dict[nn.Parameter, torch.Tensor]], None]


def _per_sample_affine_grads(x: torch.Tensor, g: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n``'s scale and shift gradients, (N, C) each: ``sum(g[n] * x[n])`` and
    ``sum(g[n])`` over the non-channel axes (a batched dot product: no N x C x H x W
    temporary)."""
    return torch.einsum("nc...,nc...->nc", g, x), torch.einsum("nc...->nc", g)


class _ChannelAffineFunction(torch.autograd.Function):
    """``x * weight + bias`` per channel, whose backward reduces the parameter
    gradients from the per-sample ones (cheaper than autograd's elementwise product
    and sum) and hands those to a sink when one is set."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                sink: PerSampleSink | None) -> torch.Tensor:
        return torch.addcmul(_channel_view(bias, x.ndim), x, _channel_view(weight, x.ndim))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, sink = inputs
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)
        ctx.sink = sink

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = g * _channel_view(weight, g.ndim) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            per_w, per_b = _per_sample_affine_grads(x, g)
            if ctx.sink is not None:
                ctx.sink({p: gs for p, gs, needed in zip(ctx.params, (per_w, per_b),
                                                          ctx.needs_input_grad[1:3],
                                                          strict=True) if needed})
            grad_w = per_w.sum(0) if ctx.needs_input_grad[1] else None
            grad_b = per_b.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class ChannelAffine(nn.Module):
    """Trainable per-channel scale and shift: ``x * weight + bias``.

    The backward pass forms each sample's scale/shift gradient on the way to the
    parameter gradient; set ``per_sample_sink`` to a callable and it receives them
    (``{parameter: (N, C) tensor}``, trainable parameters only) on every backward
    pass, which is how :class:`client.dp_sgd.FlatDPSGD` gets them for free.

    Parameters
    ----------
    weight : torch.Tensor
        Initial per-channel scale.
    bias : torch.Tensor
        Initial per-channel shift.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float())
        self.per_sample_sink: PerSampleSink | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ChannelAffineFunction.apply(x, self.weight, self.bias, self.per_sample_sink)


@register_grad_sampler(ChannelAffine)
def channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of :class:`ChannelAffine` for Opacus's hooks."""
    per_w, per_b = _per_sample_affine_grads(activations[0], backprops)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = per_w
    if layer.bias.requires_grad:
        grads[layer.bias] = per_b
    return grads


class NormAffine(nn.Module):
    """What a BatchNorm (optionally fused with dropout and activation) becomes.

    The output is always a fresh tensor, never the affine's own output, so that an
    in-place operation downstream (``out += identity`` in torchvision's residual
    blocks) cannot touch a tensor that Opacus's backward hook holds.

    Parameters
    ----------
    norm : FrozenNorm
        The frozen-statistics normalisation.
    affine : ChannelAffine
        The trainable scale and shift.
    drop : nn.Module or None (default: None)
        Dropout applied after the affine (timm's ``BatchNormAct2d`` carries one).
    act : nn.Module or None (default: None)
        Activation applied last; must not be in-place.
    """

    def __init__(
        self,
        norm: FrozenNorm,
        affine: ChannelAffine,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.affine = affine
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self._fresh_output = isinstance(self.drop, nn.Identity) and isinstance(
            self.act, nn.Identity
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.drop(self.affine(self.norm(x))))
        return y.clone() if self._fresh_output else y


def _not_inplace(module: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on a module and its children, where they have one."""
    for sub in module.modules():
        if hasattr(sub, "inplace"):
            sub.inplace = False
    return module


def from_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> NormAffine:
    """Build the :class:`NormAffine` equal to ``bn`` in eval mode.

    timm's ``BatchNormAct2d`` (a BatchNorm subclass with ``drop`` and ``act``) keeps
    its dropout and activation, with ``inplace`` turned off.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
            "cannot freeze its statistics."
        )
    channels = bn.num_features
    weight = bn.weight if bn.affine else torch.ones(channels)
    bias = bn.bias if bn.affine else torch.zeros(channels)
    drop = getattr(bn, "drop", None)
    act = getattr(bn, "act", None)
    return NormAffine(
        FrozenNorm(bn.running_mean, bn.running_var, bn.eps),
        ChannelAffine(weight, bias),
        drop=_not_inplace(drop) if drop is not None else None,
        act=_not_inplace(act) if act is not None else None,
    )


def replace_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm in ``model`` (in place) by a :class:`NormAffine`.

    Returns
    -------
    int
        The number of BatchNorm layers replaced.
    """
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, from_batchnorm(child))
            count += 1
        else:
            count += replace_batchnorm(child)
    return count
