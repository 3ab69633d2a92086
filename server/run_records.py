"""What the server keeps of a run: its history (JSON) and the names of its record files.

The final parameters (:data:`FINAL_ARRAYS_FILE`) are written and read with the one
npz writer, :func:`common.atomic_files.save_arrays` and
:func:`~common.atomic_files.load_arrays`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write_text

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

