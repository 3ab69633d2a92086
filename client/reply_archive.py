"""The replies a site sent, kept so that a repeated request is answered without a new release.

When the server crashes after the sites answered a round, it resumes that round
and asks again. A site that trained and charged the round once must not train
and charge it twice: it sends the reply it recorded. Only what already left the
site is kept (DP releases and the releases its policy allows), beside its
ledger, one file per kind of message (the latest round only), written after the
ledger charged the release.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.atomic_files import atomic_write_bytes


class ReplyArchive:
    """The latest reply of each kind a site sent for one run.

    Parameters
    ----------
    directory : Path
        Where the files go (one per kind of message).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, kind: str) -> Path:
        return self.directory / f"{kind.replace('.', '-')}.npz"

    def load(self, kind: str, round_: int) -> RecordDict | None:
        """The reply sent to ``kind`` in ``round_``, if that is the latest one kept."""
        path = self._path(kind)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta["round"] != round_:
                return None
            content = RecordDict()
            for name, keys in meta["arrays"].items():
                content[name] = ArrayRecord({k: Array(data[f"{name}/{k}"]) for k in keys})
        for name, values in meta["metrics"].items():
            content[name] = MetricRecord(values)
        for name, values in meta["configs"].items():
            content[name] = ConfigRecord(values)
        return content

    def save(self, kind: str, round_: int, content: RecordDict) -> None:
        """Keep ``content`` as the reply to ``kind`` in ``round_`` (replacing older rounds')."""
        arrays = {f"{name}/{k}": a.numpy() for name, record in content.array_records.items()
                  for k, a in record.items()}
        meta = {
            "round": round_,
            "arrays": {name: list(record) for name, record in content.array_records.items()},
            "metrics": {name: dict(r) for name, r in content.metric_records.items()},
            "configs": {name: dict(r) for name, r in content.config_records.items()},
        }
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write_bytes(self._path(kind), buffer.getvalue())
