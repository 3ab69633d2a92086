"""The server's checkpoint: everything needed to resume a run after a crash.

Written after every round, and once more when the run's final records are
written, as one ``.npz`` file, atomically (temporary file,
fsync, rename), so a crash leaves either the previous checkpoint or the new
one. It holds the global parameters, the round just finished, the run key the
sites' ledgers know the run by, the strategy's state (history and FedAdam
moments) and the shift monitor's state, plus a fingerprint of the run's
settings: a checkpoint resumes only a run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_VERSION = 1
UNFINGERPRINTED_KEYS = ("state-dir",)
"""Settings that may change between a crash and the resume (where the state lives)."""


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
    """Strategy state held in arrays (FedAdam moments)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint at ``path``; None when there is none.

    Raises
    ------
    CheckpointError
        When the file cannot be read, or was written by a run with other settings
        (resuming it would mix two runs' parameters and privacy plans).
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
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot read the checkpoint {path}: {exc}. Move it away to start the run afresh "
            "(the sites' ledgers keep what they spent)"
        ) from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {meta.get('version')}, "
                              f"this fedshift reads version {CHECKPOINT_VERSION}")
    if meta["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to a run with other settings; resume with the same "
            "run config, or give this run another state-dir"
        )
    return Checkpoint(
        run_key=meta["run_key"], fingerprint=meta["fingerprint"],
        server_round=int(meta["server_round"]),
        arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        strategy=meta["strategy"], strategy_arrays=strategy_arrays, monitor=meta["monitor"],
        finished=bool(meta["finished"]),
    )
