"""Studies: a grid of simulated runs from one TOML file, resumable and parallel.

A study file lists one or more grids; each grid is the product of its methods
(:mod:`simulations.methods`), epsilons, site counts, label skews, covariate
severities and the study's seeds. Every combination is a *cell*: one run in its
own directory ``OUT/cells/<key>/`` (``cell.json`` with its settings, ``log.txt``,
``state/`` and, once finished, ``results.json``). A finished cell is not run
again; an unfinished one is wiped and run afresh (its ledgers must not carry
privacy spent over). Layout::

    name = "default"
    dataset = "pneumoniamnist"     # any data set fedshift reads (default)
    seeds = [0]                    # default [0]

    [federation]                   # FederationConfig settings for every cell
    image_size = 32

    [methods.gn-full]              # settings for one method's cells
    lr = 0.1

    [variants.fedshift-lr1]        # a named variant of a method, usable in grids
    method = "fedshift"
    lr = 1.0

    [[grid]]
    methods = ["fedshift", "local", "head"]
    epsilon = [1.0, inf]           # inf: DP off (non-private reference)
    sites = [4]                    # default [4]
    label_skew = [0.0]             # Dirichlet alpha; 0: default class mixes
    severity = [0.0]               # scanner shift at every odd-numbered site
    seeds = [0, 1]                 # default: the study's seeds

Site class mixes with ``label_skew = 0``: binary tasks use the configured
prevalences when there are as many as sites, else prevalences spread evenly
over 0.4-0.9; tasks with more classes give every site the data set's mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.federation import load_federation
from common.data.splits import SiteData
from common.federation_config import ConfigError, FederationConfig
from server.run_records import write_json
from server.run_report import RESULTS_FILE
from simulations.covariate_shift import ShiftStep, apply_shifts, shift_seed
from simulations.methods import get_method
from simulations.runner import SimulatedSites
from simulations.scenario import SITE_SPLITS

logger = logging.getLogger(__name__)

CELLS_DIR = "cells"
CELL_FILE = "cell.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
GRID_KEYS = ("methods", "epsilon", "sites", "label_skew", "severity", "seeds")
STUDY_KEYS = ("name", "dataset", "seeds", "federation", "methods", "variants", "grid")
# Settings a study sets per cell, so [federation] and [methods.*] may not.
CELL_SETTINGS = ("dataset", "data_dir", "seed", "num_sites", "prevalences", "label_skew",
                 "epsilon", "dp", "state_dir", "scenario")
SHIFTED_KIND = "scanner"


class StudyError(ConfigError):
    """A study file cannot be used; the message says where and what to change."""


@dataclass(frozen=True)
class Cell:
    """One run of a study: a method at one point of the grid."""

    method: str
    epsilon: float
    sites: int
    label_skew: float
    severity: float
    seed: int

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def label(self) -> str:
        eps = f"{self.epsilon:g}" if self.private else "inf"
        return (f"{self.method}-eps{eps}-n{self.sites}-skew{self.label_skew:g}"
                f"-sev{self.severity:g}-seed{self.seed}")


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    name: str
    dataset: str
    seeds: tuple[int, ...]
    federation: Mapping[str, Any]
    method_settings: Mapping[str, Mapping[str, Any]]
    cells: tuple[Cell, ...]
    path: Path | None = None
    variants: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def base_method(self, name: str) -> str:
        """The registered method a cell's method (a variant or a method) runs."""
        return self.variants.get(name, name)


def _as_list(value: Any, where: str) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise StudyError(f"{where} is empty; give at least one value")
    return values


def _numbers(values: list[Any], where: str, integer: bool = False) -> list[Any]:
    for v in values:
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok:
            kind = "integers" if integer else "numbers"
            raise StudyError(f"{where} must hold {kind}, got {v!r}")
    return values


def _settings(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise StudyError(f"{where} must be a table of FederationConfig settings")
    known = {f.name for f in dataclasses.fields(FederationConfig)}
    settings = {k.replace("-", "_"): v for k, v in table.items()}
    for key in settings:
        if key not in known:
            raise StudyError(f"{where}: unknown setting {key!r}; see fedshift simulate --help")
        if key in CELL_SETTINGS:
            raise StudyError(f"{where}: {key!r} is set per cell by the study; remove it")
    return settings


def _method(name: str, where: str, variants: Mapping[str, str] | None = None) -> None:
    if variants and name in variants:
        return
    try:
        get_method(name)
    except ConfigError as exc:
        raise StudyError(f"{where}: {exc}") from None


def _variants(table: Any, where: str) -> tuple[dict[str, str], dict[str, Mapping[str, Any]]]:
    """``[variants.NAME]`` tables: a registered method and the settings it runs with."""
    if not isinstance(table, dict):
        raise StudyError(f"{where}: [variants] must hold one table per variant")
    bases, settings = {}, {}
    for name, body in table.items():
        inner = f"{where}: [variants.{name}]"
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            raise StudyError(f'{inner} needs method = "<a registered method>", e.g. "fedshift"')
        _method(body["method"], inner)
        try:
            get_method(name)
        except ConfigError:
            pass
        else:
            raise StudyError(f"{inner}: {name!r} is a registered method; give the variant "
                             "another name")
        bases[name] = body["method"]
        settings[name] = _settings({k: v for k, v in body.items() if k != "method"}, inner)
    return bases, settings


def _grid_cells(grid: Any, index: int, seeds: tuple[int, ...],
                variants: Mapping[str, str]) -> list[Cell]:
    where = f"[[grid]] #{index + 1}"
    if not isinstance(grid, dict):
        raise StudyError(f"{where} must be a table")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise StudyError(f"{where}: unknown keys {unknown}; known: {', '.join(GRID_KEYS)}")
    if "seeds" in grid:
        seeds = tuple(_numbers(_as_list(grid["seeds"], f"{where}.seeds"), f"{where}.seeds",
                               True))
    if "methods" not in grid:
        raise StudyError(f"{where} lists no methods")
    methods = _as_list(grid["methods"], f"{where}.methods")
    for name in methods:
        _method(str(name), where, variants)
    epsilons = _numbers(_as_list(grid.get("epsilon", [1.0]), f"{where}.epsilon"),
                        f"{where}.epsilon")
    if any(e <= 0 for e in epsilons):
        raise StudyError(f"{where}.epsilon must be > 0 (inf for no DP), got {epsilons}")
    sites = _numbers(_as_list(grid.get("sites", [4]), f"{where}.sites"), f"{where}.sites", True)
    if any(n < 1 for n in sites):
        raise StudyError(f"{where}.sites must be >= 1, got {sites}")
    skews = _numbers(_as_list(grid.get("label_skew", [0.0]), f"{where}.label_skew"),
                     f"{where}.label_skew")
    severities = _numbers(_as_list(grid.get("severity", [0.0]), f"{where}.severity"),
                          f"{where}.severity")
    if any(s < 0 or a < 0 for s in severities for a in skews):
        raise StudyError(f"{where}: label_skew and severity must be >= 0")
    return [Cell(str(m), float(e), int(n), float(a), float(s), seed)
            for m, e, n, a, s, seed in itertools.product(
                methods, epsilons, sites, skews, severities, seeds)]


def parse_study(data: Mapping[str, Any], path: Path | None = None) -> Study:
    """Check a study's parsed TOML and expand its grids into cells (duplicates once)."""
    where = str(path) if path else "study"
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{where}: unknown keys {unknown}; known: {', '.join(STUDY_KEYS)}")
    seeds = tuple(_numbers(_as_list(data.get("seeds", [0]), "seeds"), "seeds", True))
    federation = _settings(data.get("federation", {}), f"{where}: [federation]")
    methods_table = data.get("methods", {})
    if not isinstance(methods_table, dict):
        raise StudyError(f"{where}: [methods] must hold one table per method")
    method_settings = {}
    for name, table in methods_table.items():
        _method(name, f"{where}: [methods]")
        method_settings[name] = _settings(table, f"{where}: [methods.{name}]")
    variants, variant_settings = _variants(data.get("variants", {}), where)
    method_settings.update(variant_settings)
    grids = data.get("grid")
    if not isinstance(grids, list) or not grids:
        raise StudyError(f"{where} has no [[grid]] table; add one listing methods")
    cells = list(dict.fromkeys(c for i, g in enumerate(grids)
                               for c in _grid_cells(g, i, seeds, variants)))
    return Study(
        name=str(data.get("name", path.stem if path else "study")),
        dataset=str(data.get("dataset", FederationConfig.dataset)), seeds=seeds,
        federation=federation, method_settings=method_settings, cells=tuple(cells), path=path,
        variants=variants,
    )


def load_study(path: str | Path) -> Study:
    """Read and check a study file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path} is not valid TOML: {exc}") from None
    return parse_study(data, path)


def _prevalences(cell: Cell, base: FederationConfig) -> tuple[float, ...]:
    if len(base.prevalences) == cell.sites:
        return base.prevalences
    return tuple(float(p) for p in np.round(np.linspace(0.4, 0.9, cell.sites), 3))


def cell_config(study: Study, cell: Cell, data_dir: str, state_dir: Path) -> FederationConfig:
    """The run config of ``cell``: study settings, the cell's point, the method's settings."""
    base = FederationConfig(**{**study.federation, "shift": study.federation.get("shift", False)})
    base = base.replace(
        dataset=study.dataset, data_dir=data_dir, seed=cell.seed, num_sites=cell.sites,
        prevalences=_prevalences(cell, base), label_skew=cell.label_skew,
        epsilon=cell.epsilon if cell.private else base.epsilon, state_dir=str(state_dir),
    )
    method = get_method(study.base_method(cell.method))
    return method.config(base, cell.private, study.method_settings.get(cell.method))


def shifted_sites(sites: Iterable[SiteData], severity: float, seed: int) -> tuple[SiteData, ...]:
    """The sites with a scanner shift of ``severity`` at every odd-numbered site.

    Seeded as scenario files seed theirs (:func:`simulations.covariate_shift.shift_seed`
    by site and split number).
    """
    steps = (ShiftStep(SHIFTED_KIND, severity),)
    out = []
    for index, site in enumerate(sites):
        if index % 2 == 1 and severity > 0:
            images = {split: apply_shifts(x, steps, shift_seed(seed, index,
                                                               SITE_SPLITS.index(split)))
                      for split, x in site.images.items()}
            site = dataclasses.replace(site, images=images)
        out.append(site)
    return tuple(out)


def _fingerprint(cfg: FederationConfig, cell: Cell) -> str:
    settings = {**cfg.to_flower(), "state-dir": "", "data-dir": ""}
    text = json.dumps({"cell": dataclasses.asdict(cell), "config": settings}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_cell_dir(cell_dir: Path) -> dict[str, Any]:
    """Run the cell described by ``cell_dir/cell.json``; write its results there."""
    spec = json.loads((cell_dir / CELL_FILE).read_text())
    cell = Cell(**spec["cell"])
    cfg = FederationConfig.from_flower(spec["config"])
    sites = shifted_sites(load_federation(cfg), cell.severity, cell.seed)
    start = time.perf_counter()
    results = get_method(spec.get("method", cell.method)).run(cfg, SimulatedSites(sites), None)
    results["cell"] = dataclasses.asdict(cell) | {"key": spec["key"]}
    results["wall_seconds"] = time.perf_counter() - start
    write_json(cell_dir / RESULTS_FILE, results)
    return results


@dataclass(frozen=True)
class CellOutcome:
    """How one cell of a study went."""

    cell: Cell
    cell_dir: Path
    status: str  # "done", "reused" or "failed"
    detail: str = ""


def prepare_cell(study: Study, cell: Cell, out_dir: Path, data_dir: str) -> tuple[Path, bool]:
    """The cell's directory with its ``cell.json``; True when it has finished already."""
    cell_dir = out_dir / CELLS_DIR / cell.label()
    cfg = cell_config(study, cell, data_dir, cell_dir / "state")
    key = _fingerprint(cfg, cell)
    spec_path = cell_dir / CELL_FILE
    if (cell_dir / RESULTS_FILE).exists() and spec_path.exists():
        if json.loads(spec_path.read_text()).get("key") == key:
            return cell_dir, True
        raise StudyError(
            f"{cell_dir} holds a finished run with other settings than the study's now; "
            "use another --out, or delete that cell to run it again"
        )
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    write_json(spec_path, {"key": key, "cell": dataclasses.asdict(cell),
                           "method": study.base_method(cell.method), "config": cfg.to_flower()})
    return cell_dir, False


def _run_in_child(cell_dir: Path, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with (cell_dir / LOG_FILE).open("w") as log:
        return subprocess.run([sys.executable, "-m", "simulations.study", str(cell_dir)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)


def run_study(study: Study, out_dir: Path, data_dir: str = "", jobs: int = 1,
              on_cell: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every unfinished cell of ``study`` under ``out_dir``, ``jobs`` at a time.

    Each cell runs in its own process (its own Flower simulation); a failed cell
    is reported with the end of its log and the others go on.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        return _run_cells(study, out_dir, data_dir, jobs, on_cell)


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock: a second study there would wipe the cells this one runs."""
    with (out_dir / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"another fedshift study is running in {out_dir}; wait for it to end or use "
                "another --out"
            ) from None
        yield


def _run_cells(study: Study, out_dir: Path, data_dir: str, jobs: int,
               on_cell: Callable[[CellOutcome], None] | None) -> list[CellOutcome]:
    prepared = [(cell, *prepare_cell(study, cell, out_dir, data_dir)) for cell in study.cells]
    outcomes = []
    for cell, cell_dir, finished in prepared:
        if finished:
            outcomes.append(CellOutcome(cell, cell_dir, "reused"))
            if on_cell is not None:
                on_cell(outcomes[-1])
    todo = [(cell, cell_dir) for cell, cell_dir, finished in prepared if not finished]
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = {pool.submit(_run_in_child, cell_dir, threads): (cell, cell_dir)
                   for cell, cell_dir in todo}
        for future in as_completed(futures):
            cell, cell_dir = futures[future]
            done = future.result().returncode == 0 and (cell_dir / RESULTS_FILE).exists()
            detail = "" if done else _log_tail(cell_dir / LOG_FILE)
            outcomes.append(CellOutcome(cell, cell_dir, "done" if done else "failed", detail))
            if on_cell is not None:
                on_cell(outcomes[-1])
    return outcomes


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    """Run one prepared cell: ``python -m simulations.study CELL_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_cell_dir(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
