"""What the server keeps of a run: its history (JSON) and final parameters (npz)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

HISTORY_FILE = "history.json"
SHIFT_FILE = "shift.json"
FINAL_ARRAYS_FILE = "final_arrays.npz"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically; non-finite floats become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(_json_safe(data), fh, indent=2, allow_nan=False)
    os.replace(tmp, path)


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    """Save an ArrayRecord as an npz file keyed by parameter name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **{k: a.numpy() for k, a in arrays.items()})
    os.replace(tmp, path)


def load_arrays(path: Path) -> ArrayRecord:
    """Load an npz file written by :func:`save_arrays`."""
    with np.load(path) as data:
        return ArrayRecord({k: Array(data[k]) for k in data.files})
