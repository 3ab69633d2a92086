"""What the server keeps of a run: its history (JSON) and final parameters (npz)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.atomic_files import atomic_write, atomic_write_text

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
    """Write ``data`` as JSON atomically and durably; non-finite floats become null.

    The text is made before the file is touched, so data that cannot be written as
    JSON leaves ``path`` as it was.
    """
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, allow_nan=False))


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    """Save an ArrayRecord as an npz file keyed by parameter name, atomically and durably."""
    payload = {k: a.numpy() for k, a in arrays.items()}
    atomic_write(path, lambda fh: np.savez(fh, **payload))


def load_arrays(path: Path) -> ArrayRecord:
    """Load an npz file written by :func:`save_arrays`."""
    with np.load(path) as data:
        return ArrayRecord({k: Array(data[k]) for k in data.files})
