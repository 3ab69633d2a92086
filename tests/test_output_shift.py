"""BBSD on noisy score histograms: label shift passes, covariate shift is flagged."""

from __future__ import annotations

import numpy as np

from common.output_shift import output_shift, output_shifts

BINS = 8
NEGATIVE = np.array([0.10, 0.25, 0.25, 0.20, 0.10, 0.05, 0.03, 0.02])
POSITIVE = NEGATIVE[::-1].copy()
NOISE = 20.0


def _pool(rng: np.random.Generator, prior: float, n: int = 400,
          conditionals: tuple[np.ndarray, np.ndarray] = (NEGATIVE, POSITIVE)) -> np.ndarray:
    mix = (1 - prior) * conditionals[0] + prior * conditionals[1]
    return rng.multinomial(n, mix) + rng.normal(0, NOISE, BINS)


MIDDLE = np.array([0.0, 0.0, 0.1, 0.4, 0.4, 0.1, 0.0, 0.0])
# A covariate shift the model's outputs see: on blurred or noisier images it is less
# sure of either class, so both classes' scores move towards the middle. (A shift
# that moves all scores one way looks like a prior change on a 1-D output; see the
# module docstring.)
UNSURE = (0.2 * NEGATIVE + 0.8 * MIDDLE, 0.2 * POSITIVE + 0.8 * MIDDLE)


PRIORS = (0.2, 0.4, 0.6, 0.75, 0.9)


def _reference(rng: np.random.Generator) -> tuple[list, list]:
    return [_pool(rng, 1 - p) for p in PRIORS[:4]], [NOISE] * 4


def test_label_shift_alone_is_not_flagged_even_beyond_the_reference_priors() -> None:
    rng = np.random.default_rng(0)
    flags = []
    for trial in range(12):
        pools, noise = _reference(rng)
        flags.append(output_shift(_pool(rng, 0.95), NOISE, pools, noise, 2, draws=150,
                                  seed=trial).flagged)
    assert np.mean(flags) <= 1 / 12


def test_a_covariate_shift_of_the_outputs_is_flagged() -> None:
    rng = np.random.default_rng(1)
    flags = []
    for trial in range(12):
        pools, noise = _reference(rng)
        flags.append(output_shift(_pool(rng, 0.5, conditionals=UNSURE), NOISE, pools, noise,
                                  2, draws=150, seed=trial).flagged)
    # Weak by nature at this DP noise with four reference pools (see the module
    # docstring); a detector that found nothing would fail this.
    assert np.mean(flags) >= 2 / 3


def test_the_federation_flags_its_shifted_site_only() -> None:
    rng = np.random.default_rng(2)
    names = ("a", "b", "c", "d", "x")
    pools = {n: _pool(rng, 1 - p, conditionals=UNSURE if n == "x" else (NEGATIVE, POSITIVE))
             for n, p in zip(names, PRIORS, strict=True)}
    results = output_shifts(pools, dict.fromkeys(names, NOISE), 2, draws=150)
    assert {n for n, r in results.items() if r.flagged} == {"x"}


def test_too_few_sites_give_no_result() -> None:
    rng = np.random.default_rng(3)
    pools = {"a": _pool(rng, 0.3), "b": _pool(rng, 0.6)}
    assert output_shifts(pools, dict.fromkeys(pools, NOISE), 2) == {}
