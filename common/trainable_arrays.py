"""The trainable parameters as Flower ArrayRecords: the only thing that travels."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.model_surgery import FedShiftModel


class ArrayMismatch(ValueError):
    """Received arrays do not match the model's trainable parameters."""


def trainable_arrays(model: FedShiftModel) -> ArrayRecord:
    """The model's trainable parameters (float32, CPU) keyed by parameter name."""
    return ArrayRecord({
        name: Array(p.detach().cpu().float().numpy().copy())
        for name, p in model.named_parameters() if p.requires_grad
    })


def load_trainable_arrays(model: FedShiftModel, record: ArrayRecord) -> None:
    """Copy ``record`` into the model's trainable parameters.

    Raises
    ------
    ArrayMismatch
        When names, shapes or values do not fit (missing or extra keys, another
        shape, non-finite numbers).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(record)), sorted(set(record) - set(params))
    if missing or extra:
        raise ArrayMismatch(
            f"arrays do not match the model's trainable parameters (mode {model.mode}): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}; are server and site "
            "running the same backbone and transfer mode?"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = record[name].numpy()
            if value.shape != tuple(p.shape):
                raise ArrayMismatch(
                    f"{name}: received shape {value.shape}, model has {tuple(p.shape)}"
                )
            if not np.all(np.isfinite(value)):
                raise ArrayMismatch(f"{name}: received non-finite values")
            p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data in ``record``."""
    return sum(len(array.data) for array in record.values())


def full_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, as full-model FedAvg would send them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
