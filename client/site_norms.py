"""Where a site keeps its adapted normalisation statistics for a run.

With ``adapt-norm-layers`` a site estimates the statistics of its first
normalisation layers once per run (:mod:`common.norm_adaptation`; charged to its
ledger by :mod:`client.site_work`) and keeps them in a file on its own disk,
beside its ledger, named after the run key: a resumed run (same key) keeps them
and a new run estimates its own. They are buffers, not trainable parameters, so
no reply ever carries them.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic_files import load_npz, save_npz
from common.norm_adaptation import NormStatistics

NORMS_DIR = "adapted-norms"


def norms_path(site_dir: Path, site: str, run_key: str) -> Path:
    """Where ``site`` keeps its adapted statistics for run ``run_key``."""
    return site_dir / NORMS_DIR / f"{site}-{run_key}.npz"


def save_statistics(path: Path, statistics: dict[str, NormStatistics]) -> None:
    """Write ``statistics`` (layer name -> statistics) to ``path`` atomically, owner-only."""
    save_npz(path, {f"{name}.{part}": getattr(stats, part)
                    for name, stats in statistics.items() for part in ("mean", "var")},
             mode=0o600)


def load_statistics(path: Path) -> dict[str, NormStatistics] | None:
    """The statistics saved at ``path`` (layer name -> statistics); None if there are none."""
    if not path.exists():
        return None
    saved = load_npz(path)
    names = sorted({key.rpartition(".")[0] for key in saved})
    return {name: NormStatistics(saved[f"{name}.mean"], saved[f"{name}.var"]) for name in names}
