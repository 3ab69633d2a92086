"""A site's privacy ledger: every release it made, kept on its own disk.

The ledger is a JSON file written atomically (:mod:`common.atomic_files`), so
it survives crashes and restarts. It records each DP release with its mechanism
parameters (noise multiplier, sample rate, steps) and each non-DP release that
the site's configuration allows by name, and the noise plan of every run. The
epsilon it reports is certified from the recorded parameters by
:func:`common.privacy_accounting.certify` (the smaller of the PRV and RDP
bounds); each charge and plan records which accountant certified it, and the
file states both bounds. A release that would take the site past its budget is
refused before anything is computed or sent, and work that is refused writes
nothing. Entries and plans written before the PRV accountant carry no
accountant: RDP certified them.

**The guarantee.** Neighbouring data sets differ by adding or removing one
record (one image with its label). Every DP release names the *part* of the
site's data it reads: ``train`` (DP-SGD, moment summaries, label histograms,
the DP example count), ``validation``, ``deployment`` (the unlabelled pool) and
``test`` (evaluation). By default all releases compose sequentially, whatever
part they read: a person with one record in each part is covered by the
ledger's epsilon. Only where the site declares that no person has records in
two parts (``composition = "parallel-parts"``) is the site's epsilon the largest
of its parts' (parallel composition). A person with k records in one part is
covered at group-privacy level k, as with any record-level guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write_text
from common.privacy_accounting import ACCOUNTANTS, GaussianRelease, PrivacyCertificate, certify

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
PARTS = ("train", "validation", "deployment", "test")
COMPOSITIONS = ("sequential", "parallel-parts")
NEIGHBOURING = "add or remove one record"


class BudgetExceeded(RuntimeError):
    """A release would take the site past its (epsilon, delta) budget."""


class LedgerError(RuntimeError):
    """The ledger file cannot be read or written, or holds entries it should not."""


@dataclass(frozen=True)
class Reservation:
    """Releases of one mechanism on one part that a run's plan set aside budget for.

    Each is a plain Gaussian mechanism (sample rate 1) at ``noise_multiplier``;
    the run may make at most ``releases`` of them.
    """

    mechanism: str
    part: str
    noise_multiplier: float
    releases: int

    def release(self, count: int = 1) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, 1.0, count)


@dataclass(frozen=True)
class NoisePlan:
    """The noise a site fixed for a run: chosen once so the whole run fits its budget.

    DP-SGD takes ``planned_rounds`` x ``steps_per_round`` steps at
    ``noise_multiplier``; ``reserved`` lists the other releases the run may make
    (moment summaries, evaluations, score histograms, a DP count), whose cost
    was set aside before DP-SGD's noise was sized. ``accountant`` names the
    accountant that certified the whole planned run within budget (plans
    written before PRV was used were RDP's).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    moment_noise: float = 0.0
    reserved: tuple[Reservation, ...] = ()
    accountant: str = "rdp"

    def reservation(self, mechanism: str, part: str) -> Reservation | None:
        """The reservation for ``mechanism`` on ``part``, if the plan made one."""
        return next((r for r in self.reserved if (r.mechanism, r.part) == (mechanism, part)),
                    None)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reserved": [asdict(r) for r in self.reserved]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NoisePlan:
        reserved = tuple(Reservation(**r) for r in data.get("reserved", ()))
        return cls(**{**data, "reserved": reserved})


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded release: DP (``kind`` "gaussian") or non-DP allowed by name."""

    kind: str
    run: str
    round: int
    what: str
    time: float
    part: str = "train"
    mechanism: str = "dp-sgd"
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    steps: int = 0
    allowed_by: str = ""
    value: float | None = None
    """A released noisy value the site sends again instead of releasing anew (DP count)."""
    accountant: str = ""
    """The accountant that certified the site's epsilon after a DP release ("prv", "rdp")."""

    @property
    def release(self) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, self.sample_rate, self.steps)

    @classmethod
    def parse(cls, data: dict[str, Any], source: Path) -> LedgerEntry:
        try:
            entry = cls(**data)
        except TypeError as exc:
            raise LedgerError(f"privacy ledger {source} holds a malformed entry {data!r}: "
                              f"{exc}; restore it from backup") from None
        if entry.kind == "gaussian" and "accountant" not in data:
            entry = replace(entry, accountant="rdp")  # written before PRV was used
        if entry.kind not in ("gaussian", "allowed") or entry.part not in PARTS or (
                entry.kind == "gaussian" and not (
                    entry.noise_multiplier > 0 and 0 < entry.sample_rate <= 1
                    and entry.steps >= 0 and math.isfinite(entry.noise_multiplier)
                    and entry.accountant in ACCOUNTANTS)):
            raise LedgerError(f"privacy ledger {source} holds an entry it cannot account for: "
                              f"{data!r}; restore it from backup")
        return entry


class PrivacyLedger:
    """The privacy ledger of one site.

    Parameters
    ----------
    path : Path
        The ledger file; created (with its directory) when missing, unless
        ``must_exist``.
    target_epsilon : float
        The site's budget for everything it releases.
    delta : float
        The site's delta.
    composition : str (default: "sequential")
        ``sequential``: every release composes with every other. ``parallel-parts``:
        the site declares that no person has records in two parts of its data,
        so releases on different parts compose in parallel.
    must_exist : bool (default: False)
        Refuse to start from an empty ledger when the file is missing (a site that
        has released before must not forget it).
    """

    def __init__(self, path: Path, target_epsilon: float, delta: float,
                 composition: str = "sequential", must_exist: bool = False) -> None:
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}, "
                             f"got {composition!r}")
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.composition = composition
        if must_exist and not self.path.exists():
            raise LedgerError(
                f"privacy ledger {self.path} is missing, but the site file says it exists "
                "(ledger_must_exist = true): a missing ledger would count as nothing spent. "
                "Restore it from backup, or set ledger_must_exist = false for a new site"
            )
        self._data = self._read()
        recorded = self._data.get("delta")
        if recorded is not None and recorded != self.delta:
            raise LedgerError(
                f"ledger {self.path} accounts at delta={recorded} but the site is configured "
                f"with delta={self.delta}; set delta back to {recorded}: what the ledger records "
                "was spent at that delta, and a new ledger file would forget it"
            )

    # ----------------------------------------------------------------- storage

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            self._entries: list[LedgerEntry] = []
            return {"version": LEDGER_VERSION, "delta": None, "plans": {}, "releases": []}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to release "
                "anything until it is restored from backup"
            ) from exc
        if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
            raise LedgerError(f"privacy ledger {self.path} has unknown version "
                              f"{data.get('version') if isinstance(data, dict) else data!r}")
        self._entries = [LedgerEntry.parse(r, self.path) for r in data.get("releases", [])]
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
        spent = self.certificate()
        self._data["guarantee"] = {
            "neighbouring": NEIGHBOURING, "composition": self.composition,
            "epsilon_budget": self.target_epsilon, "delta": self.delta,
            "epsilon_spent": spent.epsilon, "accountant": spent.accountant,
            "epsilon_prv": spent.prv_epsilon, "epsilon_rdp": spent.rdp_epsilon,
        }
        self._data["releases"] = [asdict(e) for e in self._entries]
        # Plans written before PRV was used name no accountant: RDP sized them.
        self._data["plans"] = {run: {"accountant": "rdp", **plan}
                               for run, plan in self._data["plans"].items()}
        atomic_write_text(self.path, json.dumps(self._data, indent=1))

    # ----------------------------------------------------------------- queries

    def _certificate(self, by_part: dict[str, list[GaussianRelease]]) -> PrivacyCertificate:
        if self.composition == "sequential":
            return certify([r for rs in by_part.values() for r in rs], self.delta)
        return _parallel([certify(rs, self.delta) for rs in by_part.values()])

    def _by_part(self, extra: Iterable[tuple[GaussianRelease, str]] = ()
                 ) -> dict[str, list[GaussianRelease]]:
        out: dict[str, list[GaussianRelease]] = {p: [] for p in PARTS}
        for e in self._entries:
            if e.kind == "gaussian":
                out[e.part].append(e.release)
        for release, part in extra:
            _check_part(part)
            out[part].append(release)
        return out

    def releases(self, part: str | None = None) -> list[GaussianRelease]:
        """Every DP release recorded (on ``part`` only, when given), as mechanism parameters."""
        if part is not None:
            _check_part(part)
        return [e.release for e in self._entries
                if e.kind == "gaussian" and (part is None or e.part == part)]

    def composing_with(self, part: str) -> list[GaussianRelease]:
        """The recorded releases a new release on ``part`` composes with."""
        return self.releases(None if self.composition == "sequential" else part)

    def entries(self) -> list[LedgerEntry]:
        """All recorded releases (DP and allowed non-DP), oldest first."""
        return list(self._entries)

    def certificate(self, part: str | None = None) -> PrivacyCertificate:
        """The certified epsilon of everything released so far (or on ``part`` alone).

        Parameters
        ----------
        part : str | None
            One part of the site's data, or None for the site's whole spend under
            its composition.
        """
        if part is not None:
            return certify(self.releases(part), self.delta)
        return self._certificate(self._by_part())

    def certificate_after(self, additions: Iterable[tuple[GaussianRelease, str]]
                          ) -> PrivacyCertificate:
        """The certified epsilon the site would have spent after ``additions`` (release, part)."""
        return self._certificate(self._by_part(additions))

    def epsilon_spent(self, part: str | None = None) -> float:
        """Epsilon of everything released so far (or on ``part`` alone), at the ledger's delta."""
        return self.certificate(part).epsilon

    def epsilon_after(self, additions: Iterable[tuple[GaussianRelease, str]]) -> float:
        """Epsilon the site would have spent after ``additions`` (release, part)."""
        return self.certificate_after(additions).epsilon

    def plan(self, run_key: str) -> NoisePlan | None:
        """The noise plan fixed for ``run_key``, if any."""
        plan = self._data["plans"].get(run_key)
        return NoisePlan.from_json(plan) if plan else None

    def made(self, run_key: str, mechanism: str, part: str | None = None) -> list[LedgerEntry]:
        """The releases of ``mechanism`` (on ``part``) recorded for ``run_key``."""
        return [e for e in self._entries if e.kind == "gaussian" and e.run == run_key
                and e.mechanism == mechanism and (part is None or e.part == part)]

    # ----------------------------------------------------------------- updates

    def check(self, release: GaussianRelease, what: str, part: str = "train"
              ) -> PrivacyCertificate:
        """Raise :class:`BudgetExceeded` if ``release`` does not fit; certify epsilon after it."""
        after = self.certificate_after([(release, part)])
        if after.epsilon > self.target_epsilon + 1e-9:
            raise BudgetExceeded(
                f"refused {what}: it would raise this site's epsilon from "
                f"{self.epsilon_spent():.4f} to {after.epsilon:.4f} (by "
                f"{after.accountant.upper()}), above its budget of {self.target_epsilon:g} "
                f"(delta={self.delta:g}, {self.composition} composition); nothing was "
                "computed or sent"
            )
        return after

    def charge(self, release: GaussianRelease, run_key: str, round_: int, what: str,
               part: str = "train", mechanism: str = "dp-sgd", plan: NoisePlan | None = None,
               value: float | None = None) -> float:
        """Record a DP release on ``part`` after checking it fits; return epsilon spent.

        ``plan`` is recorded for ``run_key`` with the run's first release (so that
        refused work writes nothing); ``value`` keeps a released noisy number the
        site sends again rather than releasing anew.
        """
        _check_part(part)
        with self._locked():
            after = self.check(release, what, part)
            if plan is not None and run_key not in self._data["plans"]:
                self._data["plans"][run_key] = plan.to_json()
            self._entries = [*self._entries, LedgerEntry(
                kind="gaussian", run=run_key, round=round_, what=what, time=time.time(),
                part=part, mechanism=mechanism, noise_multiplier=release.noise_multiplier,
                sample_rate=release.sample_rate, steps=release.steps, value=value,
                accountant=after.accountant)]
            self._write()
        logger.info("ledger %s: %s charged, epsilon spent %.4f of %g (%s; PRV %s, RDP %.4f)",
                    self.path, what, after.epsilon, self.target_epsilon, after.accountant,
                    _format(after.prv_epsilon), after.rdp_epsilon)
        return after.epsilon

    def record_allowed(self, run_key: str, round_: int, what: str, allowed_by: str) -> None:
        """Record a non-DP release that the site's configuration ``allowed_by`` permits."""
        with self._locked():
            self._entries = [*self._entries, LedgerEntry(
                kind="allowed", run=run_key, round=round_, what=what, time=time.time(),
                allowed_by=allowed_by)]
            self._write()


def _parallel(certificates: list[PrivacyCertificate]) -> PrivacyCertificate:
    """Parts composed in parallel: the site's epsilon is its largest part's.

    The certificate is the binding part's; the PRV and RDP epsilons are each
    accountant's alone (the largest part's by it), so the certified epsilon is at
    most either.
    """
    spent = [c for c in certificates if c.accountant != "none"]
    if not spent:
        return PrivacyCertificate(0.0, "none", 0.0, 0.0)
    binding = max(spent, key=lambda c: c.epsilon)
    prv = [c.prv_epsilon for c in spent]
    return PrivacyCertificate(
        binding.epsilon, binding.accountant,
        None if None in prv else max(p for p in prv if p is not None),
        max(c.rdp_epsilon for c in spent))


def _format(epsilon: float | None) -> str:
    return "n/a" if epsilon is None else f"{epsilon:.4f}"


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown data part {part!r}; parts are {', '.join(PARTS)}")
