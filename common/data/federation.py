"""The data of each simulated site: per-site train / validation / test splits.

Each split of the data set (see :func:`common.data.datasets.load_image_dataset`) is
partitioned across sites with that site's class mix, so every site has its own
train, validation and test data, disjoint from every other site's. The class mixes:

- ``label_skew > 0``: one Dirichlet draw per site (the same mix for its three
  splits), see :func:`dirichlet_class_mixes`;
- ``label_skew == 0``, binary task: each site's ``prevalences`` value is its
  fraction of class 1;
- ``label_skew == 0``, more classes: every site gets each split's own class mix.

Each split gives every site the same number of images: the largest number that
the pool can serve with every site's mix.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from common.data.datasets import dataset_channels, load_image_dataset
from common.data.partition import binary_class_probs, partition_by_class_probs
from common.data.splits import SPLITS, ImageSplits, SiteData
from common.data.tensors import to_model_input
from common.federation_config import ConfigError, FederationConfig

logger = logging.getLogger(__name__)

MIN_TRAIN_PER_SITE = 10


def site_name(index: int) -> str:
    return f"site-{index}"


def _uses_prevalences(cfg: FederationConfig) -> bool:
    return cfg.label_skew == 0 and cfg.num_classes == 2


def class_frequencies(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) share of each class among ``labels`` (all zeros when there are none)."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(float)
    return counts / counts.sum() if counts.sum() else counts


def dirichlet_class_mixes(class_freqs: np.ndarray, label_skew: float, num_sites: int,
                          rng: np.random.Generator) -> np.ndarray:
    """(S, C) class mixes, one draw per site from Dirichlet(``label_skew`` · C · ``class_freqs``).

    Parameters
    ----------
    class_freqs : np.ndarray
        (C,) class frequencies of the data set (summing to 1). A class with frequency
        0 gets share 0 at every site.
    label_skew : float
        Concentration alpha > 0: small gives skewed mixes, large ones close to ``class_freqs``.
    num_sites : int
        Number of sites S (rows).
    rng : np.random.Generator
        Source of the draws, one per site in site order.
    """
    freqs = np.asarray(class_freqs, dtype=float)
    present = freqs > 0
    concentration = label_skew * len(freqs) * freqs[present]
    mixes = np.zeros((num_sites, len(freqs)))
    for site in range(num_sites):
        mixes[site, present] = rng.dirichlet(concentration)
    return mixes


def _check_matches_config(cfg: FederationConfig, splits: ImageSplits) -> None:
    if splits.num_classes != cfg.num_classes:
        raise ConfigError(
            f"{cfg.dataset} has {splits.num_classes} classes but num-classes is "
            f"{cfg.num_classes}; set num-classes = {splits.num_classes}"
        )
    channels = dataset_channels(splits)
    if channels != cfg.in_channels:
        kind = "grey images (1 channel)" if channels == 1 else "colour images (3 channels)"
        raise ConfigError(
            f"{cfg.dataset} has {kind} but in-channels is {cfg.in_channels}; "
            f"set in-channels = {channels}"
        )


def _site_mixes(cfg: FederationConfig, splits: ImageSplits, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """(S, C) class mix per split."""
    if _uses_prevalences(cfg):
        probs = binary_class_probs(list(cfg.prevalences))
        return {s: probs for s in SPLITS}
    if cfg.label_skew > 0:
        pooled = np.concatenate([splits.labels[s] for s in SPLITS])
        mixes = dirichlet_class_mixes(class_frequencies(pooled, cfg.num_classes),
                                      cfg.label_skew, cfg.num_sites, rng)
        logger.info("label-skew %g: site class mixes %s", cfg.label_skew,
                    np.array2string(mixes, precision=2, suppress_small=True))
        return {s: mixes for s in SPLITS}
    return {s: np.tile(class_frequencies(splits.labels[s], cfg.num_classes),
                       (cfg.num_sites, 1)) for s in SPLITS}


def _remedy(cfg: FederationConfig) -> str:
    if cfg.label_skew > 0:
        return (f"with label-skew = {cfg.label_skew:g} (a skewed site can ask for many images "
                "of a rare class); raise label-skew for milder skew, lower num-sites or "
                "try another seed")
    return "with the data set's class mix; lower num-sites"


def _partition(cfg: FederationConfig, splits: ImageSplits, rng: np.random.Generator
               ) -> dict[str, list[np.ndarray]]:
    """Indices of every site's images per split."""
    mixes = _site_mixes(cfg, splits, rng)
    if _uses_prevalences(cfg):
        try:
            return {s: partition_by_class_probs(splits.labels[s], mixes[s], rng)
                    for s in SPLITS}
        except ValueError as exc:
            raise ConfigError(
                f"cannot split {splits.source.name} into {cfg.num_sites} sites with "
                f"prevalences {list(cfg.prevalences)}: {exc}"
            ) from exc
    per_split = {}
    for split in SPLITS:
        try:
            per_split[split] = partition_by_class_probs(splits.labels[split], mixes[split], rng)
        except ValueError as exc:
            raise ConfigError(
                f"cannot split the {split} split of {splits.source.name} into "
                f"{cfg.num_sites} sites ({exc}) {_remedy(cfg)}"
            ) from exc
        if split == "train" and len(per_split[split][0]) < MIN_TRAIN_PER_SITE:
            raise ConfigError(
                f"the train split of {splits.source.name} leaves only "
                f"{len(per_split[split][0])} images per site for {cfg.num_sites} sites "
                f"{_remedy(cfg)}; every site needs at least {MIN_TRAIN_PER_SITE}"
            )
    return per_split


@functools.lru_cache(maxsize=2)
def load_federation(cfg: FederationConfig) -> tuple[SiteData, ...]:
    """Every simulated site's data for ``cfg`` (deterministic in ``cfg.seed``).

    Raises
    ------
    ConfigError
        When the data set does not match ``num-classes`` / ``in-channels``, the
        prevalences do not fit ``num-sites``, or the sites' class mixes cannot be
        served (the message names the setting to change).
    DataFileError
        When the data set cannot be found or read.
    """
    if _uses_prevalences(cfg) and len(cfg.prevalences) != cfg.num_sites:
        raise ConfigError(
            f"prevalences lists {len(cfg.prevalences)} values for {cfg.num_sites} simulated "
            "sites; give one per site"
        )
    splits = load_image_dataset(cfg.dataset, cfg.data_dir or None, cfg.seed,
                                cfg.image_size)
    _check_matches_config(cfg, splits)
    rng = np.random.default_rng(cfg.seed)
    per_split = _partition(cfg, splits, rng)
    sites = []
    for i in range(cfg.num_sites):
        images = {s: to_model_input(splits.images[s][per_split[s][i]], cfg.image_size)
                  for s in SPLITS}
        labels = {s: torch.from_numpy(splits.labels[s][per_split[s][i]]) for s in SPLITS}
        sites.append(SiteData(site_name(i), images, labels, splits.num_classes))
    return tuple(sites)
