"""Local training: step counts match the ledger's plan, FedProx pulls towards the global model."""

from __future__ import annotations

import pytest
import torch

from client import local_training
from client.local_training import (
    LocalTrainingConfig,
    _proximal_step,
    batches_per_epoch,
    steps_per_round,
    train_locally,
)
from common.model_surgery import ModelSpec, build_model


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 32, 32, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def test_dp_and_non_dp_take_the_planned_steps_at_the_planned_rate() -> None:
    images, labels = _data(40)
    cfg = LocalTrainingConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd", clip=0.1)
    assert batches_per_epoch(40, 16) == 3 and steps_per_round(40, cfg) == 6
    for noise in (None, 1.0):
        outcome = train_locally(build_model(ModelSpec()), images, labels, cfg, noise,
                                torch.device("cpu"))
        assert outcome.steps == 6
        assert outcome.sample_rate == 1 / 3


def test_training_changes_only_trainable_parameters() -> None:
    images, labels = _data()
    model = build_model(ModelSpec())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names())
    train_locally(model, images, labels, LocalTrainingConfig(batch_size=8, lr=0.5,
                  optimizer="sgd", clip=0.1), 1.0, torch.device("cpu"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


def test_proximal_step_moves_each_parameter_towards_the_global_one() -> None:
    model = build_model(ModelSpec(mode="head"))
    head = model.backbone.classifier
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        head.weight.add_(1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _proximal_step(model, global_params, optimizer, mu=2.0)
    # w - lr * mu * (w - g) with w - g = 1: the gap shrinks by 20 %.
    torch.testing.assert_close(head.weight - global_params[0],
                               torch.full_like(head.weight, 0.8))


def test_dp_takes_the_flat_path_unless_every_layer_trains(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    taken: list[str] = []
    monkeypatch.setattr(local_training, "_train_flat_dp", lambda *a: taken.append("flat"))
    monkeypatch.setattr(local_training, "_train_opacus", lambda *a: taken.append("opacus"))
    images, labels = _data(8)
    cfg = LocalTrainingConfig(batch_size=4, clip=0.1)
    for mode in ("bn+head", "head", "partial:1", "full-gn"):
        train_locally(build_model(ModelSpec(mode=mode)), images, labels, cfg, 1.0,
                      torch.device("cpu"))
    assert taken == ["flat", "flat", "flat", "opacus"]
