"""Simulation scenarios: sites with known label, covariate and concept shifts.

A scenario file (TOML) describes every simulated site: the class-1 prevalence of
its labelled splits (train / val / test), the prevalence of its unlabelled
deployment pool, an injected covariate shift (:mod:`simulations.covariate_shift`)
and a concept shift (a rule that makes labels mean something else at that site).
:func:`load_scenario` reads and checks the file; :func:`build_sites` draws each
site's images from the data file and returns the sites' data with the ground truth
that shift estimators are scored against.

Layout::

    name = "shift5"                 # default: the file's stem
    dataset = "pneumoniamnist"      # default
    seed = 0                        # default

    [federation]                    # optional FederationConfig overrides
    num_rounds = 5

    [defaults]                      # optional default sizes (image counts)
    train = 400
    val = 80
    test = 60
    pool = 400

    [label_shift]                   # optional: draw every site's prevalence
    dirichlet_alpha = 2.0           # from Beta(a, a), seeded by `seed`

    [[sites]]
    name = "site-0"                 # default: site-<index>
    prevalence = 0.2                # class-1 fraction of train / val / test
    deploy_prevalence = 0.6         # class-1 fraction of the pool; default: prevalence
    train = 180                     # sizes: here or in [defaults]
    covariate = {kind = "scanner", severity = 2}   # or several, applied in order:
    # covariate = [{kind = "blur", severity = 2}, {kind = "noise", severity = 1}]
    concept = {fraction = 0.5, rule = "flip-positives"}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.partition import PoolTooSmall, binary_class_probs, class_counts, draw_disjoint
from common.data.splits import POOL, SITE_SPLITS, SPLITS, ImageSplits, SiteData
from common.data.tensors import to_model_input
from common.federation_config import ConfigError, FederationConfig
from common.messages import SITE_NAME_PATTERN
from simulations.covariate_shift import SHIFTS, ShiftStep, apply_shifts, shift_seed

logger = logging.getLogger(__name__)

NO_SHIFT = "none"
COVARIATE_KINDS = (NO_SHIFT, *SHIFTS)
SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
# FederationConfig settings a scenario fixes itself, so [federation] may not set them.
SCENARIO_SETTINGS = ("dataset", "seed", "num_sites", "prevalences", "scenario")

# Independent random streams derived from the scenario seed; stream 2 is the
# covariate shifts' (simulations.covariate_shift.SHIFT_STREAM).
_PREVALENCE_STREAM, _SAMPLING_STREAM, _CONCEPT_STREAM = 0, 1, 3

Scalar = str | int | float | bool


class ScenarioError(ConfigError):
    """A scenario cannot be read or built; the message says where and what to change."""


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------- concept rules


ConceptRule = Callable[[np.ndarray, torch.Tensor, float, np.random.Generator], np.ndarray]


def flip_positives(labels: np.ndarray, images: torch.Tensor, fraction: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A random ``fraction`` of class-1 labels become 0: the site codes mild cases as normal.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels; left unchanged.
    images : torch.Tensor
        (N, C, S, S) images of those labels (unused by this rule).
    fraction : float
        Share of the class-1 labels flipped, ``round(fraction * positives)`` of them
        (rounded half up).
    rng : np.random.Generator
        Picks the flipped labels.
    """
    out = labels.copy()
    positives = np.flatnonzero(labels == 1)
    flipped = rng.choice(positives, size=_round_half_up(fraction * len(positives)),
                         replace=False)
    out[flipped] = 0
    return out


def flip_bright_positives(labels: np.ndarray, images: torch.Tensor, fraction: float,
                          rng: np.random.Generator) -> np.ndarray:
    """The ``fraction`` of class-1 images with the highest mean intensity are labelled 0.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels; left unchanged.
    images : torch.Tensor
        (N, C, S, S) images of those labels, as the site sees them (after its
        covariate shift).
    fraction : float
        Share of the class-1 labels flipped, ``round(fraction * positives)`` of them
        (rounded half up).
    rng : np.random.Generator
        Unused (the rule is deterministic); part of the common signature.
    """
    out = labels.copy()
    positives = np.flatnonzero(labels == 1)
    brightness = images[torch.from_numpy(positives)].mean(dim=(1, 2, 3)).numpy()
    brightest = np.argsort(-brightness, kind="stable")
    out[positives[brightest[:_round_half_up(fraction * len(positives))]]] = 0
    return out


CONCEPT_RULES: dict[str, ConceptRule] = {
    "flip-positives": flip_positives,
    "flip-bright-positives": flip_bright_positives,
}


# ------------------------------------------------------------------------- specs


def _shift_step(kind: Any, severity: Any, where: str) -> ShiftStep:
    """One checked shift, with messages that name the scenario key."""
    if kind not in SHIFTS:
        raise ScenarioError(
            f"{where}.kind = {kind!r} is not a known shift; use one of: "
            f"{', '.join(COVARIATE_KINDS)}"
        )
    if not (_is_number(severity) and math.isfinite(severity) and severity >= 0):
        raise ScenarioError(
            f"{where}.severity = {severity!r} must be a number >= 0 "
            "(1, 2, 3: mild, moderate, strong)"
        )
    return ShiftStep(kind, severity)


@dataclass(frozen=True)
class CovariateSpec:
    """The covariate shifts injected into one site's images, applied in order.

    Parameters
    ----------
    shifts : tuple[ShiftStep, ...] (default: none)
        Shifts of :data:`simulations.covariate_shift.SHIFTS` with their severities.
    """

    shifts: tuple[ShiftStep, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shifts", tuple(self.shifts))
        for step in self.shifts:
            if not isinstance(step, ShiftStep):
                raise ScenarioError(f"covariate shifts must be ShiftStep values, got {step!r}")

    @property
    def kind(self) -> str:
        """``"none"``, the one kind, or the kinds joined by ``+`` in order."""
        return "+".join(step.kind for step in self.shifts) or NO_SHIFT

    @property
    def severity(self) -> float:
        """The largest severity of the site's shifts (0 without any): what scores rank."""
        return max((step.severity for step in self.shifts), default=0.0)


@dataclass(frozen=True)
class ConceptSpec:
    """The concept shift of one site: a rule that relabels part of its class 1.

    Parameters
    ----------
    fraction : float (default: 0.0)
        Share of class-1 labels the rule relabels, in [0, 1] (0: no concept shift).
    rule : str (default: "flip-positives")
        A name in :data:`CONCEPT_RULES`.
    """

    fraction: float = 0.0
    rule: str = "flip-positives"

    def __post_init__(self) -> None:
        if self.rule not in CONCEPT_RULES:
            raise ScenarioError(
                f"concept.rule = {self.rule!r} is not a known rule; use one of: "
                f"{', '.join(CONCEPT_RULES)}"
            )
        if not (_is_number(self.fraction) and 0 <= self.fraction <= 1):
            raise ScenarioError(
                f"concept.fraction = {self.fraction!r} must be a number in [0, 1] "
                "(the share of class-1 labels relabelled)"
            )
        object.__setattr__(self, "fraction", float(self.fraction))


@dataclass(frozen=True)
class SiteSpec:
    """One simulated site: class mixes, split sizes (image counts) and injected shifts.

    Parameters
    ----------
    name : str
        Site name, unique in the scenario: 1 to 64 letters, digits, '.', '_' or '-',
        starting with a letter or digit (the site runs, keeps its ledger and is
        reported under it).
    prevalence : float
        Class-1 fraction of the labelled splits (train, val, test), in [0, 1].
    deploy_prevalence : float
        Class-1 fraction of the unlabelled deployment pool, in [0, 1].
    train : int
        Training images, >= 1.
    val : int
        Validation images, >= 0.
    test : int
        Test images, >= 0.
    pool : int
        Deployment pool images (labels hidden from the site), >= 0.
    covariate : CovariateSpec (default: no shift)
        Covariate shift applied to all of the site's images.
    concept : ConceptSpec (default: no shift)
        Concept shift applied to all of the site's labels.
    """

    name: str
    prevalence: float
    deploy_prevalence: float
    train: int
    val: int
    test: int
    pool: int
    covariate: CovariateSpec = field(default_factory=CovariateSpec)
    concept: ConceptSpec = field(default_factory=ConceptSpec)

    def __post_init__(self) -> None:
        where = f"site {self.name!r}"
        if not isinstance(self.name, str) or not SITE_NAME_PATTERN.fullmatch(self.name):
            raise ScenarioError(
                f"site name {self.name!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (e.g. 'st-marys'); the site runs, keeps "
                "its ledger and is reported under it"
            )
        for key in ("prevalence", "deploy_prevalence"):
            value = getattr(self, key)
            if not (_is_number(value) and 0 <= value <= 1):
                raise ScenarioError(
                    f"{where}: {key} = {value!r} must be a class-1 fraction in [0, 1]"
                )
            object.__setattr__(self, key, float(value))
        for key in SITE_SPLITS:
            value, least = getattr(self, key), 1 if key == "train" else 0
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ScenarioError(
                    f"{where}: {key} = {value!r} must be a whole number of images >= {least}"
                )

    def size(self, split: str) -> int:
        """Images in ``split`` (train, val, test or pool)."""
        return getattr(self, split)

    def class_one_fraction(self, split: str) -> float:
        """Class-1 fraction drawn for ``split``: the pool's is ``deploy_prevalence``."""
        return self.deploy_prevalence if split == POOL else self.prevalence


@dataclass(frozen=True)
class Scenario:
    """A simulated federation with known shifts.

    Parameters
    ----------
    name : str
        Scenario name (reports, output folders).
    dataset : str
        MedMNIST flag of the data file the sites are drawn from.
    seed : int
        Seed of every random choice: prevalences drawn from ``[label_shift]``, the
        images each site gets, sensor noise and concept flips.
    sites : tuple[SiteSpec, ...]
        The sites, at least one, with unique names.
    federation : dict[str, str | int | float | bool] (default: empty)
        FederationConfig overrides (underscored setting names, e.g. ``num_rounds``).
    path : Path | None (default: None)
        File the scenario was read from; None when built in code.
    """

    name: str
    dataset: str
    seed: int
    sites: tuple[SiteSpec, ...]
    federation: dict[str, Scalar] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        for key in ("name", "dataset"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ScenarioError(f"{key} = {getattr(self, key)!r} must be a non-empty string")
        _check_seed(self.seed)
        if not self.sites:
            raise ScenarioError("the scenario has no sites; add at least one [[sites]] entry")
        names = [site.name for site in self.sites]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ScenarioError(
                f"site names {repeated} appear more than once; give every site its own name"
            )
        _check_federation(self.federation)

    @property
    def where(self) -> str:
        """The scenario's file, or its name when built in code (for messages)."""
        return str(self.path) if self.path is not None else f"scenario {self.name!r}"


def _check_seed(seed: Any) -> None:
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ScenarioError(f"seed = {seed!r} must be a whole number >= 0")


def _check_federation(overrides: Mapping[str, Any]) -> None:
    fixed = sorted(set(overrides) & set(SCENARIO_SETTINGS))
    if fixed:
        raise ScenarioError(
            f"[federation] sets {fixed}, which the scenario itself fixes (top-level dataset "
            "and seed, the [[sites]] list, the scenario file); remove them from [federation]"
        )
    bad = [k for k, v in overrides.items() if not isinstance(v, Scalar)]
    if bad:
        raise ScenarioError(
            f"[federation] {bad} must be plain values (string, number or boolean), not tables "
            "or arrays"
        )
    try:
        FederationConfig.from_flower(overrides)
    except ConfigError as exc:
        raise ScenarioError(f"[federation]: {exc}") from None


# --------------------------------------------------------------------- loading

_TOP_KEYS = ("name", "dataset", "seed", "federation", "defaults", "label_shift", "sites")
_SITE_KEYS = ("name", "prevalence", "deploy_prevalence", *SITE_SPLITS, "covariate", "concept")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where} must be a table, got {value!r}")
    return value


def _check_keys(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ScenarioError(
            f"unknown key(s) {unknown} in {where}; known keys: {', '.join(known)}"
        )


def _covariate_entry(table: dict[str, Any], where: str) -> ShiftStep | None:
    _check_keys(table, ("kind", "severity"), where)
    kind = table.get("kind", NO_SHIFT)
    if kind == NO_SHIFT:
        if table.get("severity", 0) != 0:
            raise ScenarioError(
                f"{where}.severity = {table['severity']!r} has no effect without a kind; set "
                f"{where}.kind to one of {', '.join(SHIFTS)}, or drop the severity"
            )
        return None
    if "severity" not in table:
        raise ScenarioError(
            f"{where}.kind = {kind!r} needs a severity (1, 2, 3: mild, moderate, strong)"
        )
    return _shift_step(kind, table["severity"], where)


def _covariate(value: Any) -> CovariateSpec:
    """``covariate``: one table ``{kind, severity}`` or an array of them, applied in order."""
    if isinstance(value, dict):
        step = _covariate_entry(value, "covariate")
        return CovariateSpec(() if step is None else (step,))
    if not isinstance(value, list) or not value:
        raise ScenarioError(
            f"covariate must be a table {{kind = ..., severity = ...}} or a non-empty array "
            f"of them (applied in order), got {value!r}"
        )
    steps = []
    for i, entry in enumerate(value):
        where = f"covariate[{i}]"
        step = _covariate_entry(_table(entry, where), where)
        if step is None:
            raise ScenarioError(f"{where} has no kind; every shift in an array needs one "
                                f"of: {', '.join(SHIFTS)}")
        steps.append(step)
    return CovariateSpec(tuple(steps))


def _concept(table: dict[str, Any]) -> ConceptSpec:
    _check_keys(table, ("fraction", "rule"), "concept")
    return ConceptSpec(**table)


def _draw_prevalences(table: dict[str, Any], num_sites: int, seed: int) -> list[float]:
    _check_keys(table, ("dirichlet_alpha",), "[label_shift]")
    alpha = table.get("dirichlet_alpha")
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ScenarioError(
            f"[label_shift] dirichlet_alpha = {alpha!r} must be a number > 0 (small: sites' "
            "prevalences far apart; large: all near 0.5)"
        )
    rng = np.random.default_rng([seed, _PREVALENCE_STREAM])
    return [float(p) for p in rng.beta(alpha, alpha, size=num_sites)]


def _site(entry: dict[str, Any], index: int, defaults: dict[str, Any],
          drawn: list[float] | None) -> SiteSpec:
    name = entry.get("name", f"site-{index}")
    try:
        _check_keys(entry, _SITE_KEYS, "this [[sites]] entry")
        if drawn is not None and "prevalence" in entry:
            raise ScenarioError(
                "prevalence is set while [label_shift] draws every site's prevalence; "
                "remove one of the two"
            )
        if drawn is None and "prevalence" not in entry:
            raise ScenarioError(
                "prevalence is missing; set it (class-1 fraction in [0, 1]) or draw all "
                "sites' prevalences with [label_shift] dirichlet_alpha"
            )
        prevalence = drawn[index] if drawn is not None else entry["prevalence"]
        sizes = {}
        for key in SITE_SPLITS:
            if key not in entry and key not in defaults:
                raise ScenarioError(
                    f"{key} (number of images) is missing; set it here or in [defaults]"
                )
            sizes[key] = entry.get(key, defaults.get(key))
        return SiteSpec(
            name=name, prevalence=prevalence,
            deploy_prevalence=entry.get("deploy_prevalence", prevalence), **sizes,
            covariate=_covariate(entry.get("covariate", {})),
            concept=_concept(_table(entry.get("concept", {}), "concept")),
        )
    except ScenarioError as exc:
        text = str(exc).removeprefix(f"site {name!r}: ")
        raise ScenarioError(f"[[sites]] entry {index + 1} ({name!r}): {text}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file.

    Parameters
    ----------
    path : str | Path
        TOML scenario file (layout in this module's docstring).

    Raises
    ------
    ScenarioError
        When the file is missing, is not TOML, or a value is missing, unknown or out
        of range; the message names the file, the site and the field.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ScenarioError(
            f"scenario file {path} does not exist; give the path of a .toml scenario "
            f"(the bundled ones are in {SCENARIOS_DIR})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path} is not valid TOML ({exc}); fix its syntax") from None
    try:
        _check_keys(data, _TOP_KEYS, "the top level")
        entries = data.get("sites")
        if not isinstance(entries, list) or not entries:
            raise ScenarioError("no [[sites]] entries; describe every site in a [[sites]] table")
        defaults = _table(data.get("defaults", {}), "[defaults]")
        _check_keys(defaults, SITE_SPLITS, "[defaults]")
        seed = data.get("seed", 0)
        _check_seed(seed)
        drawn = None
        if "label_shift" in data:
            drawn = _draw_prevalences(_table(data["label_shift"], "[label_shift]"),
                                      len(entries), seed)
        sites = tuple(_site(_table(entry, "[[sites]] entry"), i, defaults, drawn)
                      for i, entry in enumerate(entries))
        federation = _table(data.get("federation", {}), "[federation]")
        return Scenario(
            name=data.get("name", path.stem), dataset=data.get("dataset", "pneumoniamnist"),
            seed=seed, sites=sites,
            federation={k.replace("-", "_"): v for k, v in federation.items()}, path=path,
        )
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def default_scenario_path() -> Path:
    """The bundled five-site scenario ``simulations/scenarios/shift5.toml``."""
    return SCENARIOS_DIR / "shift5.toml"


# --------------------------------------------------------------------- building


@dataclass(frozen=True)
class SiteTruth:
    """The shifts a site really has, to score estimators against.

    Parameters
    ----------
    name : str
        Site name.
    training_prior : tuple[float, ...]
        Class fractions of the site's final training labels (after its concept shift).
    deployment_prior : tuple[float, ...]
        Class fractions of its pool's final hidden labels; empty when the pool is.
    covariate_kind : str
        Injected covariate shift (``"none"`` if none; several joined by ``+``).
    severity : float
        Its severity (the largest of several).
    concept_fraction : float
        Share of class-1 labels relabelled by the concept rule (0: none).
    concept_rule : str
        The concept rule.
    rows : dict[str, np.ndarray]
        Per split, the rows of the data file's images the site got, numbered over the
        file's train, val and test splits in that order (provenance; left out of
        :meth:`to_dict`).
    """

    name: str
    training_prior: tuple[float, ...]
    deployment_prior: tuple[float, ...]
    covariate_kind: str
    severity: float
    concept_fraction: float
    concept_rule: str
    rows: dict[str, np.ndarray] = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth, with the size of each split instead of its rows."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "rows"}
        out["training_prior"] = list(self.training_prior)
        out["deployment_prior"] = list(self.deployment_prior)
        out["sizes"] = {split: len(rows) for split, rows in self.rows.items()}
        return out


def _draw_rows(scenario: Scenario, labels: np.ndarray, source: str
               ) -> list[dict[str, np.ndarray]]:
    """Disjoint rows per site and split with the requested class mixes."""
    # (sites, splits, classes): class 1 rounded half up, as build_sites promises
    counts = np.array([[class_counts(site.size(s), mix) for s, mix in zip(
        SITE_SPLITS, binary_class_probs([site.class_one_fraction(s) for s in SITE_SPLITS]),
        strict=True)] for site in scenario.sites])
    rng = np.random.default_rng([scenario.seed, _SAMPLING_STREAM])
    try:
        parts = draw_disjoint(labels, counts.reshape(-1, 2), rng)
    except PoolTooSmall as short:
        per_site = ", ".join(f"{site.name} {n}" for site, n in
                             zip(scenario.sites, counts[:, :, short.label].sum(axis=1),
                                 strict=True))
        raise ScenarioError(
            f"{scenario.where}: the sites need {short.needed} images of class {short.label} "
            f"({per_site}) but {source} has {short.available} (train, val and test "
            "together); reduce the sites' sizes (train/val/test/pool) or the share of class "
            f"{short.label} in their prevalences"
        ) from None
    cells = len(SITE_SPLITS)
    return [dict(zip(SITE_SPLITS, parts[i:i + cells], strict=True))
            for i in range(0, len(parts), cells)]


def _prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    if len(labels) == 0:
        return ()
    return tuple(float(v) for v in np.bincount(labels, minlength=num_classes) / len(labels))


def build_sites(scenario: Scenario, splits: ImageSplits, image_size: int
                ) -> tuple[tuple[SiteData, ...], tuple[SiteTruth, ...]]:
    """Draw every site's data from ``splits`` and inject its shifts.

    All official splits of the file (train, val, test) form one labelled pool; each
    site draws disjoint train, val, test and pool images from it, per class, with
    class-1 fraction ``prevalence`` (``deploy_prevalence`` for the pool; counts
    rounded half up). Images are resized to ``image_size``, the site's covariate
    shift is applied to all its splits and its concept rule to all its labels, the
    pool's hidden labels included (``SiteData`` split ``"pool"``: for scoring only).

    Parameters
    ----------
    scenario : Scenario
        The sites to build; deterministic in ``scenario.seed``.
    splits : ImageSplits
        The data file, a binary task.
    image_size : int
        Side of the square images the sites get.

    Returns
    -------
    tuple[tuple[SiteData, ...], tuple[SiteTruth, ...]]
        Per site, in scenario order, its data and its ground truth.

    Raises
    ------
    ScenarioError
        When the task is not binary or the file lacks the images of a class the
        sites need.
    """
    if splits.num_classes != 2:
        raise ScenarioError(
            f"{scenario.where}: {splits.source.name} has {splits.num_classes} classes; "
            "prevalence-based scenarios need a binary task (classes 0 and 1)"
        )
    images = np.concatenate([splits.images[s] for s in SPLITS])
    labels = np.concatenate([splits.labels[s] for s in SPLITS])
    drawn = _draw_rows(scenario, labels, splits.source.name)
    sites, truths = [], []
    for i, (spec, rows) in enumerate(zip(scenario.sites, drawn, strict=True)):
        site_images, site_labels = {}, {}
        for j, split in enumerate(SITE_SPLITS):
            x = to_model_input(images[rows[split]], image_size)
            if spec.covariate.shifts:
                x = apply_shifts(x, spec.covariate.shifts, shift_seed(scenario.seed, i, j))
            rule_rng = np.random.default_rng([scenario.seed, _CONCEPT_STREAM, i, j])
            y = CONCEPT_RULES[spec.concept.rule](labels[rows[split]], x,
                                                 spec.concept.fraction, rule_rng)
            site_images[split] = x
            site_labels[split] = torch.from_numpy(y.astype(np.int64))
        sites.append(SiteData(spec.name, site_images, site_labels, splits.num_classes))
        truths.append(SiteTruth(
            name=spec.name,
            training_prior=_prior(site_labels["train"].numpy(), splits.num_classes),
            deployment_prior=_prior(site_labels[POOL].numpy(), splits.num_classes),
            covariate_kind=spec.covariate.kind, severity=spec.covariate.severity,
            concept_fraction=spec.concept.fraction, concept_rule=spec.concept.rule,
            rows=rows,
        ))
        logger.info("%s: %s images, class-1 %.2f (pool %.2f), covariate %s %.1f, concept %.2f",
                    spec.name, "/".join(str(len(rows[s])) for s in SITE_SPLITS),
                    truths[-1].training_prior[1],
                    truths[-1].deployment_prior[1] if truths[-1].deployment_prior else math.nan,
                    spec.covariate.kind, spec.covariate.severity, spec.concept.fraction)
    return tuple(sites), tuple(truths)
