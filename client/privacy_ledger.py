"""A site's privacy ledger: every release it made, kept on its own disk.

The ledger is a JSON file written atomically (temporary file, fsync, rename), so
it survives crashes and restarts. It records each DP release with its mechanism
parameters (noise multiplier, sample rate, steps) and each non-DP release that
the site's configuration allows (evaluation metrics, example counts), and the
noise plan of every run. The epsilon it reports is computed from the recorded
parameters by :func:`common.privacy_accounting.epsilon_spent`. A release that
would take the site past its budget is refused before anything is trained or sent.

Every DP release names the *part* of the site's data it reads: ``train`` (the
labelled training records: DP-SGD, moment summaries, label histograms),
``validation`` (the labelled validation records) or ``deployment`` (the unlabelled
deployment pool). The parts hold disjoint records, so by parallel composition the
site's epsilon is the largest epsilon of any one part, each part's releases
composed sequentially. This assumes each person's records sit in one part only
(as record-level DP assumes one record per person).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from common.privacy_accounting import GaussianRelease, epsilon_spent

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
PARTS = ("train", "validation", "deployment")


class BudgetExceeded(RuntimeError):
    """A release would take the site past its (epsilon, delta) budget."""


class LedgerError(RuntimeError):
    """The ledger file cannot be read or written."""


@dataclass(frozen=True)
class NoisePlan:
    """The noise a site fixed for a run: chosen once so the whole run fits its budget."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    moment_noise: float = 0.0


class PrivacyLedger:
    """The privacy ledger of one site.

    Parameters
    ----------
    path : Path
        The ledger file; created (with its directory) when missing.
    target_epsilon : float
        The site's budget for everything it releases.
    delta : float
        The site's delta.
    """

    def __init__(self, path: Path, target_epsilon: float, delta: float) -> None:
        if target_epsilon <= 0:
            raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self._data = self._read()
        recorded = self._data.get("delta")
        if recorded is not None and recorded != self.delta:
            raise LedgerError(
                f"ledger {self.path} accounts at delta={recorded} but the site is configured "
                f"with delta={self.delta}; set delta back to {recorded}: what the ledger records "
                "was spent at that delta, and a new ledger file would forget it"
            )

    # ----------------------------------------------------------------- storage

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": LEDGER_VERSION, "delta": None, "plans": {}, "releases": []}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to release "
                "anything until it is restored from backup"
            ) from exc
        if data.get("version") != LEDGER_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has unknown version {data.get('version')}"
            )
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._data = self._read()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self) -> None:
        self._data["delta"] = self.delta
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ----------------------------------------------------------------- queries

    def releases(self, part: str = "train") -> list[GaussianRelease]:
        """Every DP release recorded on ``part`` of the data, as mechanism parameters."""
        _check_part(part)
        return [
            GaussianRelease(r["noise_multiplier"], r["sample_rate"], r["steps"])
            for r in self._data["releases"]
            if r["kind"] == "gaussian" and r.get("part", "train") == part
        ]

    def entries(self) -> list[dict]:
        """All recorded releases (DP and allowed non-DP), oldest first."""
        return [dict(r) for r in self._data["releases"]]

    def epsilon_spent(self, part: str | None = None) -> float:
        """Epsilon of everything released so far (or on ``part`` only), at the ledger's delta."""
        if part is not None:
            return epsilon_spent(self.releases(part), self.delta)
        return max(epsilon_spent(self.releases(p), self.delta) for p in PARTS)

    def epsilon_after(self, release: GaussianRelease, part: str = "train") -> float:
        """Epsilon the site would have spent after ``release`` on ``part``."""
        others = [epsilon_spent(self.releases(p), self.delta) for p in PARTS if p != part]
        return max([epsilon_spent([*self.releases(part), release], self.delta), *others])

    def plan(self, run_key: str) -> NoisePlan | None:
        """The noise plan fixed for ``run_key``, if any."""
        plan = self._data["plans"].get(run_key)
        return NoisePlan(**plan) if plan else None

    def steps_taken(self, run_key: str) -> int:
        """DP-SGD steps recorded for ``run_key``."""
        return sum(r["steps"] for r in self._data["releases"]
                   if r["kind"] == "gaussian" and r["run"] == run_key
                   and r.get("mechanism", "dp-sgd") == "dp-sgd")

    # ----------------------------------------------------------------- updates

    def fix_plan(self, run_key: str, plan: NoisePlan) -> NoisePlan:
        """Record ``plan`` for ``run_key`` unless one is there already; return the one in force."""
        with self._locked():
            existing = self._data["plans"].get(run_key)
            if existing:
                return NoisePlan(**existing)
            self._data["plans"][run_key] = asdict(plan)
            self._write()
        return plan

    def check(self, release: GaussianRelease, what: str, part: str = "train") -> float:
        """Raise :class:`BudgetExceeded` if ``release`` does not fit; return epsilon after it."""
        after = self.epsilon_after(release, part)
        if after > self.target_epsilon + 1e-9:
            raise BudgetExceeded(
                f"refused {what}: it would raise this site's epsilon on its {part} data from "
                f"{self.epsilon_spent(part):.4f} to {after:.4f}, above its budget of "
                f"{self.target_epsilon:g} (delta={self.delta:g}); nothing was computed or sent"
            )
        return after

    def charge(self, release: GaussianRelease, run_key: str, round_: int, what: str,
               part: str = "train", mechanism: str = "dp-sgd") -> float:
        """Record a DP release on ``part`` after checking it fits; return epsilon spent."""
        _check_part(part)
        with self._locked():
            after = self.check(release, what, part)
            self._data["releases"].append({
                "kind": "gaussian", "run": run_key, "round": round_, "what": what,
                "part": part, "mechanism": mechanism,
                "noise_multiplier": release.noise_multiplier,
                "sample_rate": release.sample_rate, "steps": release.steps,
                "time": time.time(),
            })
            self._write()
        logger.info("ledger %s: %s charged, epsilon spent %.4f of %g",
                    self.path, what, after, self.target_epsilon)
        return after

    def record_allowed(self, run_key: str, round_: int, what: str, allowed_by: str) -> None:
        """Record a non-DP release that the site's configuration ``allowed_by`` permits."""
        with self._locked():
            self._data["releases"].append({
                "kind": "allowed", "run": run_key, "round": round_, "what": what,
                "allowed_by": allowed_by, "time": time.time(),
            })
            self._write()


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown data part {part!r}; parts are {', '.join(PARTS)}")
