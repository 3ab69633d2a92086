"""The server's checkpoint: everything needed to resume a run after a crash.

Written after every round, and once more when the run's final records are
written, as one ``.npz`` file, atomically (:mod:`common.atomic_files`: temporary
file, fsync, rename, fsync of the folder), so a crash leaves either the previous
checkpoint or the new one; a file torn some other way is refused with
:class:`CheckpointError`, never half read. It holds the global parameters, the
round just finished, the run key the sites' ledgers know the run by, the
strategy's state (history, and the aggregator's array state such as FedAdam's
moments or FedAvgM's momentum, :mod:`server.aggregator_state`) and the shift
monitor's state,
plus a fingerprint of the run's settings: a checkpoint resumes only a run with
the same settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.atomic_files import atomic_write

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_VERSION = 1
UNFINGERPRINTED_KEYS = ("state-dir", "connect-timeout")
"""Settings that may change between a crash and the resume (where the state lives, how
long the server waits for sites to connect)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or belongs to a run with other settings."""


def config_fingerprint(config: dict[str, Any]) -> str:
    """A digest of the run settings that must not change when a run resumes."""
    kept = {k: v for k, v in sorted(config.items()) if k not in UNFINGERPRINTED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """The state of a run after ``server_round`` rounds."""

    run_key: str
    fingerprint: str
    server_round: int
    arrays: ArrayRecord
    strategy: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable strategy state (its history)."""
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """The aggregator's array state (:func:`server.aggregator_state.array_state`)."""
    monitor: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable shift monitor state."""
    finished: bool = False
    """Whether the run's final records (history, final parameters, shifts) are written."""


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    meta = {
        "version": CHECKPOINT_VERSION, "run_key": checkpoint.run_key,
        "fingerprint": checkpoint.fingerprint, "server_round": checkpoint.server_round,
        "strategy": checkpoint.strategy, "monitor": checkpoint.monitor,
        "finished": checkpoint.finished,
    }
    payload = {f"arrays/{k}": a.numpy() for k, a in checkpoint.arrays.items()}
    payload.update({f"strategy/{k}": v for k, v in checkpoint.strategy_arrays.items()})
    payload["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda fh: np.savez(fh, **payload))


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint at ``path``; None when there is none.

    Raises
    ------
    CheckpointError
        When the file cannot be read (truncated, corrupt, not a checkpoint), or was
        written by a run with other settings (resuming it would mix two runs'
        parameters and privacy plans).
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k.removeprefix("arrays/"): data[k] for k in data.files
                      if k.startswith("arrays/")}
            strategy_arrays = {k.removeprefix("strategy/"): data[k] for k in data.files
                               if k.startswith("strategy/")}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    # A torn or damaged npz fails in many ways (BadZipFile, EOFError, zlib.error, bad
    # array headers, bad JSON, ...); whichever it is, the file cannot be resumed from.
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {meta.get('version')}, "
                              f"this fedshift reads version {CHECKPOINT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to a run with other settings; resume with the same "
            "run config, or give this run another state-dir"
        )
    try:
        strategy, monitor = meta["strategy"], meta["monitor"]
        if not isinstance(strategy, dict) or not isinstance(monitor, dict):
            raise TypeError("its strategy and monitor states are not JSON objects")
        return Checkpoint(
            run_key=str(meta["run_key"]), fingerprint=meta["fingerprint"],
            server_round=int(meta["server_round"]),
            arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            strategy=strategy, strategy_arrays=strategy_arrays, monitor=monitor,
            finished=bool(meta["finished"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return CheckpointError(
        f"cannot read the checkpoint {path} ({reason}); it is truncated, damaged or not a "
        "fedshift checkpoint. Move it out of the state-dir to start the run afresh (the "
        "sites' ledgers keep what they spent), or restore it from a backup to resume"
    )
