"""The state a Flower strategy carries from round to round, as named arrays.

Flower's array strategies keep what they learn across rounds in attributes
that hold arrays: FedAdam, FedYogi and FedAdagrad their moments (``m_t``,
``v_t``) and the arrays they last sent, FedAvgM its momentum and the current
global arrays. :func:`array_state` reads every such attribute, whatever the
strategy, so that the server's checkpoint can keep it and a resumed run goes
on exactly; :func:`restore_array_state` puts it back. The server also uses the
pair to undo a round whose aggregate it refuses.

An attribute counts as array state when it holds an ``ArrayRecord``, a dict
of str to ndarray, or a list of ndarrays. Each array is named
``<attribute>/<kind>/<key>``: kind ``record``, ``dict`` or ``list`` (the key
is then the list index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

_RECORD, _DICT, _LIST = "record", "dict", "list"


def _kind(value: Any) -> str | None:
    if isinstance(value, ArrayRecord):
        return _RECORD if len(value) else None
    if isinstance(value, dict) and value and all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()):
        return _DICT
    if isinstance(value, list | tuple) and value and all(
            isinstance(v, np.ndarray) for v in value):
        return _LIST
    return None


def array_state(strategy: object) -> dict[str, np.ndarray]:
    """Copies of the arrays of every array-state attribute of ``strategy``."""
    out: dict[str, np.ndarray] = {}
    for attribute, value in vars(strategy).items():
        kind = _kind(value)
        if kind == _RECORD:
            items = ((k, a.numpy()) for k, a in value.items())
        elif kind == _DICT:
            items = iter(value.items())
        elif kind == _LIST:
            items = ((str(i), v) for i, v in enumerate(value))
        else:
            continue
        out.update({f"{attribute}/{kind}/{key}": np.array(v, copy=True) for key, v in items})
    return out


def restore_array_state(strategy: object, arrays: dict[str, np.ndarray]) -> None:
    """Make ``strategy``'s array state the one :func:`array_state` gave.

    Array-state attributes ``arrays`` does not name are set to None, as a fresh
    strategy has them.

    Raises
    ------
    ValueError
        When an array's name is not ``<attribute>/<kind>/<key>`` for an attribute
        ``strategy`` has (state written for another strategy or format).
    """
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        parts = name.split("/", 2)
        if len(parts) != 3 or parts[1] not in (_RECORD, _DICT, _LIST) or not hasattr(
                strategy, parts[0]):
            raise ValueError(f"{name!r} is not state of {type(strategy).__name__} (expected "
                             "<attribute>/<record|dict|list>/<key> for one of its attributes)")
        grouped.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    for attribute, value in list(vars(strategy).items()):
        if _kind(value) is not None:
            setattr(strategy, attribute, None)
    for (attribute, kind), values in grouped.items():
        if kind == _RECORD:
            setattr(strategy, attribute, ArrayRecord({k: Array(v) for k, v in values.items()}))
        elif kind == _DICT:
            setattr(strategy, attribute, dict(values))
        else:
            setattr(strategy, attribute, [values[str(i)] for i in range(len(values))])
