"""Simulation scenarios: injected covariate shifts, scenario files and site building."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.medmnist_npz import load_medmnist
from common.data.splits import SITE_SPLITS, SPLITS, ImageSplits
from common.data.tensors import to_model_input
from common.federation_config import ConfigError
from simulations.covariate_shift import (
    SHIFTS,
    ShiftStep,
    apply_shift,
    apply_shifts,
    shift_seed,
)
from simulations.scenario import (
    CONCEPT_RULES,
    SCENARIOS_DIR,
    ConceptSpec,
    CovariateSpec,
    Scenario,
    ScenarioError,
    SiteSpec,
    build_sites,
    default_scenario_path,
    load_scenario,
)

SEVERITIES = (0.0, 0.5, 1.0, 2.0, 3.0)


def half_up(value: float) -> int:
    return math.floor(value + 0.5)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth grey images with texture, like downsampled X-rays, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 1, 7, 7, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")
    return (0.8 * smooth + 0.2 * torch.rand(16, 1, 28, 28, generator=g)).clamp(0, 1)


def synthetic_splits(per_split: dict[str, tuple[int, int]], size: int = 12) -> ImageSplits:
    """Random uint8 images, ``n0`` of class 0 and ``n1`` of class 1 per split (shuffled)."""
    images, labels = {}, {}
    rng = np.random.default_rng(0)
    for split in SPLITS:
        n0, n1 = per_split[split]
        labels[split] = rng.permutation(np.array([0] * n0 + [1] * n1, dtype=np.int64))
        images[split] = rng.integers(0, 256, size=(n0 + n1, size, size), dtype=np.uint8)
    return ImageSplits(images, labels, 2, Path("synthetic.npz"))


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- covariate shifts


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_shift_is_identity_at_severity_zero(images: torch.Tensor, kind: str) -> None:
    assert torch.equal(apply_shift(images, kind, 0.0, seed=3), images)
    colour = images.repeat(1, 3, 1, 1)
    assert torch.equal(apply_shift(colour, kind, 0, seed=3), colour)


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_shift_grows_with_severity_and_stays_in_range(images: torch.Tensor, kind: str) -> None:
    before = images.clone()
    effects = []
    for severity in SEVERITIES:
        out = apply_shift(images, kind, severity, seed=1)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
        effects.append(float((out - images).abs().mean()))
    assert torch.equal(images, before), "the input must not be modified"
    assert effects[0] == 0
    assert all(a < b for a, b in itertools.pairwise(effects)), effects


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_shift_is_deterministic_per_seed(images: torch.Tensor, kind: str) -> None:
    assert torch.equal(apply_shift(images, kind, 2.0, seed=7), apply_shift(images, kind, 2.0,
                                                                           seed=7))


@pytest.mark.parametrize("kind", ["noise", "scanner"])
def test_random_shifts_depend_on_the_seed(images: torch.Tensor, kind: str) -> None:
    assert not torch.equal(apply_shift(images, kind, 2.0, seed=7),
                           apply_shift(images, kind, 2.0, seed=8))


def test_unknown_shift_names_the_valid_kinds(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError) as err:
        apply_shift(images, "contrast", 1.0)
    assert "'contrast'" in str(err.value)
    for kind in SHIFTS:
        assert kind in str(err.value)


@pytest.mark.parametrize("severity", [-0.5, math.nan, math.inf])
def test_bad_severity_is_refused(images: torch.Tensor, severity: float) -> None:
    with pytest.raises(ConfigError, match="severity"):
        apply_shift(images, "blur", severity)


# ----------------------------------------------------------------- scenario files


def test_bundled_shift5_has_the_planned_shifts() -> None:
    scenario = load_scenario(default_scenario_path())
    assert default_scenario_path() == SCENARIOS_DIR / "shift5.toml"
    assert scenario.name == "shift5" and scenario.dataset == "pneumoniamnist"
    assert scenario.federation == {"num_rounds": 5}
    sites = scenario.sites
    assert len(sites) == 5
    assert [s.prevalence for s in sites] == [0.2, 0.4, 0.6, 0.75, 0.9]
    gaps = [s.deploy_prevalence - s.prevalence for s in sites]
    assert all(0.2 - 1e-9 <= abs(g) <= 0.4 + 1e-9 for g in gaps)
    assert any(g > 0 for g in gaps) and any(g < 0 for g in gaps)
    assert all(s.pool >= 300 and s.val >= 80 and s.train >= 1 for s in sites)
    shifted = {s.covariate.severity for s in sites if s.covariate.kind == "scanner"}
    assert shifted == {1.0, 2.0, 3.0}
    plain = [s.prevalence for s in sites if s.covariate.kind == "none"]
    assert len(plain) == 2 and min(plain) <= 0.4 and max(plain) >= 0.75
    assert all(s.concept.fraction == 0 for s in sites)


def test_bundled_concept_scenario_adds_one_concept_site() -> None:
    base = load_scenario(default_scenario_path()).sites
    sites = load_scenario(SCENARIOS_DIR / "shift5_concept.toml").sites
    assert len(sites) == 6
    for a, b in zip(base, sites[:5], strict=True):
        assert (a.name, a.prevalence, a.deploy_prevalence, a.covariate, a.concept) == (
            b.name, b.prevalence, b.deploy_prevalence, b.covariate, b.concept)
        assert b.pool >= 300 and b.val >= 80
    extra = sites[5]
    assert extra.covariate == CovariateSpec()
    assert extra.concept == ConceptSpec(fraction=0.5, rule="flip-positives")
    assert extra.pool >= 300 and extra.val >= 80


MINIMAL = """
seed = 3
[defaults]
train = 10
val = 4
test = 4
pool = 6
[[sites]]
prevalence = 0.5
[[sites]]
name = "north"
prevalence = 0.25
"""


def test_defaults_names_and_deploy_prevalence(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, MINIMAL, "small-one.toml"))
    assert scenario.name == "small-one" and scenario.seed == 3
    assert [s.name for s in scenario.sites] == ["site-0", "north"]
    north = scenario.sites[1]
    assert north.deploy_prevalence == 0.25
    assert (north.train, north.val, north.test, north.pool) == (10, 4, 4, 6)
    assert north.covariate == CovariateSpec() and north.concept == ConceptSpec()
    assert scenario.federation == {}


SITE = '[[sites]]\nname = "east"\ntrain = 10\nval = 4\ntest = 4\npool = 6\n'


@pytest.mark.parametrize(("body", "words"), [
    (SITE + "prevalence = 1.5\n", ["east", "prevalence = 1.5", "[0, 1]"]),
    (SITE + "prevalence = 0.5\ndeploy_prevalence = -0.1\n", ["east", "deploy_prevalence"]),
    (SITE + 'prevalence = "high"\n', ["east", "prevalence = 'high'"]),
    (SITE.replace("train = 10", "train = 0") + "prevalence = 0.5\n", ["east", "train = 0"]),
    (SITE.replace("val = 4", "val = 4.5") + "prevalence = 0.5\n", ["east", "val = 4.5"]),
    (SITE.replace("pool = 6\n", "") + "prevalence = 0.5\n", ["east", "pool", "[defaults]"]),
    (SITE, ["east", "prevalence is missing", "dirichlet_alpha"]),
    (SITE + "prevalence = 0.5\nprevalance = 0.4\n", ["east", "prevalance", "known keys"]),
    (SITE + 'prevalence = 0.5\ncovariate = {kind = "blurr", severity = 1}\n',
     ["east", "covariate.kind = 'blurr'", "scanner", "gamma"]),
    (SITE + 'prevalence = 0.5\ncovariate = {kind = "blur"}\n',
     ["east", "covariate.kind = 'blur' needs a severity"]),
    (SITE + 'prevalence = 0.5\ncovariate = {kind = "blur", severity = -1}\n',
     ["east", "covariate.severity = -1"]),
    (SITE + "prevalence = 0.5\ncovariate = {severity = 2}\n",
     ["east", "covariate.severity = 2", "kind"]),
    (SITE + 'prevalence = 0.5\ncovariate = [{kind = "blur", severity = 1}, {kind = "nois", '
     'severity = 1}]\n', ["east", "covariate[1].kind = 'nois'", "portable"]),
    (SITE + 'prevalence = 0.5\ncovariate = [{kind = "blur", severity = 1}, {severity = 1}]\n',
     ["east", "covariate[1]", "kind"]),
    (SITE + 'prevalence = 0.5\ncovariate = [{kind = "blur"}]\n',
     ["east", "covariate[0].kind = 'blur' needs a severity"]),
    (SITE + "prevalence = 0.5\ncovariate = []\n", ["east", "covariate", "array"]),
    (SITE + 'prevalence = 0.5\ncovariate = "blur"\n', ["east", "covariate", "table"]),
    (SITE + 'prevalence = 0.5\nconcept = {fraction = 0.5, rule = "swap"}\n',
     ["east", "concept.rule = 'swap'", "flip-positives"]),
    (SITE + "prevalence = 0.5\nconcept = {fraction = 1.5}\n",
     ["east", "concept.fraction = 1.5"]),
    (SITE + "prevalence = 0.5\n" + SITE + "prevalence = 0.5\n", ["['east']", "more than once"]),
    ("[federation]\nnum_rounds = 0\n" + SITE + "prevalence = 0.5\n",
     ["[federation]", "num-rounds"]),
    ("[federation]\nnum_sites = 3\n" + SITE + "prevalence = 0.5\n",
     ["[federation]", "num_sites", "remove"]),
    ("[federation]\nbatch_sise = 3\n" + SITE + "prevalence = 0.5\n",
     ["[federation]", "batch_sise"]),
    ("seed = -1\n" + SITE + "prevalence = 0.5\n", ["seed = -1"]),
    ("sites = []\n", ["no [[sites]]"]),
    ("[label_shift]\ndirichlet_alpha = 1.0\n" + SITE + "prevalence = 0.5\n",
     ["east", "[label_shift]", "remove one"]),
    ("[label_shift]\ndirichlet_alpha = 0\n" + SITE, ["dirichlet_alpha = 0"]),
    ("[[sites]\n", ["not valid TOML"]),
])
def test_bad_scenario_names_file_site_and_field(tmp_path: Path, body: str,
                                                words: list[str]) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_missing_scenario_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "nowhere.toml")


DIRICHLET = """
seed = {seed}
[label_shift]
dirichlet_alpha = 0.5
[defaults]
train = 10
val = 4
test = 4
pool = 6
[[sites]]
[[sites]]
[[sites]]
deploy_prevalence = 0.5
[[sites]]
"""


def test_dirichlet_prevalences_are_seeded(tmp_path: Path) -> None:
    def prevalences(seed: int) -> list[float]:
        scenario = load_scenario(write(tmp_path, DIRICHLET.format(seed=seed), f"d{seed}.toml"))
        return [s.prevalence for s in scenario.sites]

    first = prevalences(1)
    assert first == prevalences(1)
    assert first != prevalences(2)
    assert all(0 <= p <= 1 for p in first) and len(set(first)) == 4
    sites = load_scenario(tmp_path / "d1.toml").sites
    assert sites[0].deploy_prevalence == sites[0].prevalence
    assert sites[2].deploy_prevalence == 0.5


# ----------------------------------------------------------------- building sites


@pytest.fixture(scope="module")
def pneumonia(pneumonia_npz: Path) -> ImageSplits:
    return load_medmnist(pneumonia_npz)


@pytest.fixture(scope="module")
def shift5(pneumonia: ImageSplits) -> tuple[Scenario, tuple, tuple]:
    scenario = load_scenario(default_scenario_path())
    sites, truths = build_sites(scenario, pneumonia, image_size=28)
    return scenario, sites, truths


def pooled(splits: ImageSplits) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([splits.images[s] for s in SPLITS]),
            np.concatenate([splits.labels[s] for s in SPLITS]))


def test_shift5_sizes_and_class_mixes(shift5: tuple) -> None:
    scenario, sites, truths = shift5
    for spec, site, truth in zip(scenario.sites, sites, truths, strict=True):
        assert site.name == truth.name == spec.name
        assert site.num_classes == 2
        for split in SITE_SPLITS:
            n = getattr(spec, split)
            wanted = spec.deploy_prevalence if split == "pool" else spec.prevalence
            labels, images = site.labels[split], site.images[split]
            assert labels.dtype == torch.int64 and labels.shape == (n,)
            assert images.shape == (n, 1, 28, 28)
            assert images.min() >= 0 and images.max() <= 1
            assert int(labels.sum()) == half_up(n * wanted), (spec.name, split)
        assert truth.training_prior[1] == pytest.approx(spec.prevalence, abs=0.5 / spec.train)
        assert truth.deployment_prior[1] == pytest.approx(spec.deploy_prevalence,
                                                          abs=0.5 / spec.pool)
        assert truth.covariate_kind == spec.covariate.kind
        assert truth.severity == spec.covariate.severity
        assert truth.concept_fraction == 0
    record = json.loads(json.dumps([t.to_dict() for t in truths]))
    assert record[0]["sizes"] == {"train": 180, "val": 80, "test": 60, "pool": 400}


def test_shift5_draws_disjoint_images_that_match_the_file(shift5: tuple,
                                                          pneumonia: ImageSplits) -> None:
    scenario, sites, truths = shift5
    file_images, file_labels = pooled(pneumonia)
    all_rows = np.concatenate([t.rows[s] for t in truths for s in SITE_SPLITS])
    assert len(np.unique(all_rows)) == len(all_rows) == sum(
        getattr(spec, s) for spec in scenario.sites for s in SITE_SPLITS)
    for spec, site, truth in zip(scenario.sites, sites, truths, strict=True):
        for split in SITE_SPLITS:
            rows = truth.rows[split]
            # No concept shift here: every label is the file's label of its row.
            assert np.array_equal(site.labels[split].numpy(), file_labels[rows])
            clean = to_model_input(file_images[rows], 28)
            if spec.covariate.kind == "none":
                assert torch.equal(site.images[split], clean)
            else:
                assert not torch.equal(site.images[split], clean)


def test_shift5_effect_grows_with_the_injected_severity(shift5: tuple,
                                                        pneumonia: ImageSplits) -> None:
    scenario, sites, truths = shift5
    file_images, _ = pooled(pneumonia)
    effect = {}
    for spec, site, truth in zip(scenario.sites, sites, truths, strict=True):
        clean = to_model_input(file_images[truth.rows["train"]], 28)
        effect[spec.covariate.severity] = float((site.images["train"] - clean).abs().mean())
    assert effect[0.0] == 0
    assert effect[1.0] < effect[2.0] < effect[3.0]


def test_building_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    splits = synthetic_splits({"train": (60, 60), "val": (20, 20), "test": (20, 20)})
    text = MINIMAL + 'covariate = {kind = "scanner", severity = 2}\n'
    scenario = load_scenario(write(tmp_path, text))
    first_sites, first_truths = build_sites(scenario, splits, image_size=16)
    again_sites, again_truths = build_sites(scenario, splits, image_size=16)
    other = load_scenario(write(tmp_path, text.replace("seed = 3", "seed = 4"), "other.toml"))
    _, other_truths = build_sites(other, splits, image_size=16)
    for a, b in zip(first_sites, again_sites, strict=True):
        for split in SITE_SPLITS:
            assert torch.equal(a.images[split], b.images[split])
            assert torch.equal(a.labels[split], b.labels[split])
    assert first_truths == again_truths
    assert not np.array_equal(first_truths[0].rows["train"], other_truths[0].rows["train"])


def test_flip_positives_changes_round_fraction_of_positives(pneumonia: ImageSplits) -> None:
    scenario = load_scenario(SCENARIOS_DIR / "shift5_concept.toml")
    sites, truths = build_sites(scenario, pneumonia, image_size=28)
    _, file_labels = pooled(pneumonia)
    for spec, site, truth in zip(scenario.sites, sites, truths, strict=True):
        for split in SITE_SPLITS:
            drawn = file_labels[truth.rows[split]]
            final = site.labels[split].numpy()
            changed = np.flatnonzero(drawn != final)
            assert np.all(drawn[changed] == 1) and np.all(final[changed] == 0)
            assert len(changed) == half_up(spec.concept.fraction * int(drawn.sum()))
        positives = half_up(spec.train * spec.prevalence)
        flipped = half_up(spec.concept.fraction * positives)
        assert truth.training_prior[1] == pytest.approx((positives - flipped) / spec.train)
        assert truth.concept_fraction == spec.concept.fraction
    assert truths[5].concept_fraction == 0.5 and truths[5].training_prior[1] < 0.5


def test_flip_bright_positives_relabels_the_brightest_positives() -> None:
    labels = np.array([1, 0, 1, 1, 0, 1, 1])
    brightness = torch.tensor([0.9, 1.0, 0.1, 0.5, 0.95, 0.7, 0.3])
    images = brightness.view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    out = CONCEPT_RULES["flip-bright-positives"](labels, images, 0.4, np.random.default_rng(0))
    # 5 positives, round(0.4 * 5) = 2: the brightest positives are rows 0 (0.9) and 5 (0.7).
    assert out.tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert labels.tolist() == [1, 0, 1, 1, 0, 1, 1], "the input must not be modified"


def test_not_enough_images_says_how_many_of_which_class(tmp_path: Path) -> None:
    splits = synthetic_splits({"train": (30, 60), "val": (5, 10), "test": (5, 10)})
    text = MINIMAL.replace("train = 10", "train = 30").replace("prevalence = 0.25",
                                                               "prevalence = 0.1")
    scenario = load_scenario(write(tmp_path, text))
    with pytest.raises(ScenarioError) as err:
        build_sites(scenario, splits, image_size=12)
    message = str(err.value)
    # Normals: site-0 15 + 2 + 2 + 3, north 27 + 4 + 4 + 5 (its pool has round(0.6) = 1
    # positive); 40 in the file.
    assert "need 62 images of class 0 (site-0 22, north 40)" in message
    assert "has 40" in message and "synthetic.npz" in message
    assert str(tmp_path / "scenario.toml") in message


def test_prevalence_scenarios_need_a_binary_task() -> None:
    splits = dataclasses.replace(
        synthetic_splits({"train": (30, 60), "val": (5, 10), "test": (5, 10)}), num_classes=3)
    site = SiteSpec("a", 0.5, 0.5, train=4, val=0, test=0, pool=0)
    with pytest.raises(ScenarioError, match="3 classes"):
        build_sites(Scenario("s", "x", 0, (site,)), splits, image_size=12)


def test_empty_pool_has_no_deployment_prior() -> None:
    splits = synthetic_splits({"train": (30, 60), "val": (5, 10), "test": (5, 10)})
    site = SiteSpec("a", 0.5, 0.5, train=8, val=2, test=0, pool=0,
                    concept=ConceptSpec(1.0, "flip-bright-positives"))
    sites, truths = build_sites(Scenario("s", "x", 0, (site,)), splits, image_size=12)
    assert truths[0].deployment_prior == ()
    assert sites[0].images["pool"].shape == (0, 1, 12, 12)
    assert truths[0].training_prior == (1.0, 0.0)


def test_several_shifts_per_site_apply_in_order_with_one_seed(tmp_path: Path) -> None:
    splits = synthetic_splits({"train": (60, 60), "val": (20, 20), "test": (20, 20)})
    both = ('covariate = [{kind = "portable", severity = 2}, '
            '{kind = "inversion", severity = 3}]\n')
    scenario = load_scenario(write(tmp_path, MINIMAL + both))
    spec = scenario.sites[1].covariate
    assert [(s.kind, s.severity) for s in spec.shifts] == [("portable", 2.0), ("inversion", 3.0)]
    assert spec.kind == "portable+inversion" and spec.severity == 3.0
    # MINIMAL's last lines belong to its second site.
    sites, truths = build_sites(scenario, splits, image_size=16)
    clean = load_scenario(write(tmp_path, MINIMAL, "clean.toml"))
    plain, _ = build_sites(clean, splits, image_size=16)
    one = load_scenario(write(tmp_path, MINIMAL + 'covariate = {kind = "portable", severity = 2}\n',
                              "one.toml"))
    first, _ = build_sites(one, splits, image_size=16)
    for split in SITE_SPLITS:
        # The inversion is deterministic: applied after the portable scanner, it
        # inverts exactly what the single-kind scenario with the same seed produced.
        torch.testing.assert_close(sites[1].images[split], 1.0 - first[1].images[split])
        assert not torch.equal(first[1].images[split], plain[1].images[split])
    assert truths[1].covariate_kind == "portable+inversion" and truths[1].severity == 3.0


def test_single_kind_seeding_is_unchanged_and_shared_with_studies() -> None:
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seed = shift_seed(5, 1, 2)
    assert seed == int(np.random.SeedSequence([5, 2, 1, 2]).generate_state(1)[0])
    assert torch.equal(apply_shifts(images, (ShiftStep("noise", 1.0),), seed),
                       apply_shift(images, "noise", 1.0, seed=seed))
    assert torch.equal(apply_shifts(images, (), seed), images)


@pytest.mark.parametrize(("kind", "severity", "words"), [
    ("blurr", 1.0, ["'blurr'", "inversion", "portable"]),
    ("blur", -1.0, ["severity", "-1.0"]),
    ("blur", True, ["severity", "True"]),
])
def test_bad_shift_steps_are_refused_with_the_valid_choices(kind: str, severity: float,
                                                            words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        ShiftStep(kind, severity)
    for word in words:
        assert word in str(err.value)
