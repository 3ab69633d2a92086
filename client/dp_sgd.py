"""DP-SGD steps whose per-sample gradients cost little more than the backward pass.

Under ``bn+head`` (and ``bn``, ``head``) the trainable layers are per-channel
affines, the 1x1 input adapter and the linear head. A sample's gradient for each
is a small contraction of the layer's input ``x``, which autograd keeps anyway for
the layer's own weight gradient, with the gradient ``g`` of the layer's output.
The affines (:class:`common.frozen_batchnorm.ChannelAffine`, nearly all of the
parameters) form them in their own backward on the way to the parameter gradient
and hand them to a sink; for the other layers :class:`FlatDPSGD` hooks the layer's
*output tensor* (a tensor hook: no module backward hooks, no wrappers around the
graph, no copies of activations) and applies Opacus's registered grad sampler for
the layer's type. Either way the per-sample gradients go straight into one flat
(batch, parameters) buffer. Clipping, the sum
and the noise then act on that flat vector: one norm per sample over all the
trainable parameters, the same clipping Opacus's ``DPOptimizer`` does per
parameter.

The mechanism is Opacus's, step for step: Poisson sampling of each example at
rate ``q``, per-sample clipping to ``clip``, Gaussian noise of standard deviation
``noise_multiplier * clip`` added to the sum, divided by the expected batch size.
Neither the sampling nor the noise is seeded (torch's default generator, as
Opacus without its secure RNG): privacy amplification and the Gaussian mechanism
both assume that randomness stays secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample.grad_sample_module import GradSampleModule
from torch import nn
from torch.utils.hooks import RemovableHandle

GradSampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor],
                       dict[nn.Parameter, torch.Tensor]]


class UnsupportedLayer(TypeError):
    """A trainable layer has no registered per-sample gradient rule."""


def _grad_sampler(module: nn.Module) -> GradSampler | None:
    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


def _has_sink(module: nn.Module) -> bool:
    """Whether the module hands over per-sample gradients itself (``per_sample_sink``)."""
    return hasattr(module, "per_sample_sink")


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that own the model's trainable parameters directly.

    Raises
    ------
    UnsupportedLayer
        When a module owning a trainable parameter has neither a per-sample sink
        nor a registered grad sampler.
    """
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _has_sink(module) and _grad_sampler(module) is None:
            raise UnsupportedLayer(
                f"{name or 'the model'} ({type(module).__name__}) trains but has no "
                "registered per-sample gradient rule"
            )
        layers.append(module)
    return layers


def supports(model: nn.Module) -> bool:
    """Whether :class:`FlatDPSGD` can train ``model`` (every trainable layer has a rule)."""
    try:
        return bool(trainable_layers(model))
    except UnsupportedLayer:
        return False


class FlatDPSGD:
    """Per-sample gradients of a model's trainable layers, clipped and noised as one vector.

    Parameters
    ----------
    model : nn.Module
        The model; every module owning a trainable parameter must hand over its
        per-sample gradients (``per_sample_sink``) or have a grad sampler
        registered with Opacus (:func:`supports`).
    clip : float
        Bound on each sample's gradient norm over all trainable parameters.
    noise_multiplier : float
        Noise standard deviation in units of ``clip``.
    expected_batch_size : float
        ``sample_rate * examples``; the noisy sum is divided by it.

    Use :meth:`attach` before the forward pass of training and :meth:`detach`
    after; between them every forward records what its backward needs. A step:
    forward and backward on the sampled batch (in chunks if need be), each followed
    by :meth:`clip_and_accumulate`, then :meth:`noisy_gradient` and
    :meth:`set_gradients`.
    """

    def __init__(self, model: nn.Module, clip: float, noise_multiplier: float,
                 expected_batch_size: float) -> None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected batch size must be > 0, got {expected_batch_size}")
        self.model = model
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.layers = trainable_layers(model)
        self.params = [p for layer in self.layers for p in layer.parameters(recurse=False)
                       if p.requires_grad]
        offsets, total = {}, 0
        for p in self.params:
            offsets[p] = total
            total += p.numel()
        self._offsets: dict[nn.Parameter, int] = offsets
        self.num_params = total
        self._flat: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._attached = False

    def attach(self) -> None:
        """Collect the trainable layers' per-sample gradients from now on."""
        if self._attached:
            return
        for layer in self.layers:
            if _has_sink(layer):
                layer.per_sample_sink = self._store
            else:
                self._handles.append(layer.register_forward_hook(self._on_forward))
        self._attached = True

    def detach(self) -> None:
        """Stop collecting."""
        for layer in self.layers:
            if _has_sink(layer):
                layer.per_sample_sink = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False

    def _store(self, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        for p, gs in grads.items():
            flat = self._buffer(len(gs), gs)
            start = self._offsets[p]
            flat[:, start:start + p.numel()].add_(gs.reshape(len(gs), -1))

    def _on_forward(self, layer: nn.Module, inputs: tuple[Any, ...],
                    output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()
        sampler = _grad_sampler(layer)
        assert sampler is not None

        def on_backward(grad: torch.Tensor) -> None:
            self._store(sampler(layer, [x], grad))

        output.register_hook(on_backward)

    def _buffer(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        if self._flat is None or self._flat.shape[0] != batch:
            self._flat = torch.zeros(batch, self.num_params, dtype=like.dtype,
                                     device=like.device)
        return self._flat

    def per_sample_gradients(self) -> torch.Tensor:
        """The (batch, parameters) per-sample gradients of the last backward pass."""
        if self._flat is None:
            raise RuntimeError("no backward pass has run since the last accumulation")
        return self._flat

    def clip_and_accumulate(self) -> None:
        """Clip each sample's gradient of the last backward pass and add it to the step's sum.

        Each sample's gradient is scaled to norm at most ``clip`` (factor
        ``clip / (norm + 1e-6)``, capped at 1, as Opacus does). A step's Poisson
        batch may be processed in several chunks, one backward pass each: the
        sum is the same, and no chunk needs more memory than the expected batch.
        """
        flat = self.per_sample_gradients()
        norms = torch.linalg.vector_norm(flat, dim=1)
        factors = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        summed = factors @ flat
        self._sum = summed if self._sum is None else self._sum + summed
        self._flat = None

    def noisy_gradient(self, device: torch.device) -> torch.Tensor:
        """The step's flat DP gradient, then ready for the next step.

        The sum of the clipped per-sample gradients accumulated since the last
        step (zero for an empty batch), plus Gaussian noise of standard deviation
        ``noise_multiplier * clip`` on every coordinate, divided by the expected
        batch size.
        """
        if self._flat is not None:
            raise RuntimeError("per-sample gradients of a backward pass were not accumulated")
        summed = self._sum if self._sum is not None else torch.zeros(self.num_params,
                                                                     device=device)
        noise = torch.normal(0.0, self.noise_multiplier * self.clip, size=summed.shape,
                             device=summed.device, dtype=summed.dtype)
        self._sum = None
        return (summed + noise) / self.expected_batch_size

    def set_gradients(self, flat_grad: torch.Tensor) -> None:
        """Write a flat gradient into the parameters' ``.grad``."""
        for p in self.params:
            start = self._offsets[p]
            p.grad = flat_grad[start:start + p.numel()].view_as(p).to(p.dtype)


def poisson_batch(num_examples: int, sample_rate: float, device: torch.device
                  ) -> torch.Tensor:
    """Indices of a Poisson sample: each example joins independently with ``sample_rate``."""
    return torch.nonzero(torch.rand(num_examples, device=device) < sample_rate).squeeze(1)
