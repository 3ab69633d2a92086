"""The data of each simulated site: per-site train / validation / test splits.

Each split of the source file is partitioned across sites with that site's class
mix (e.g. its pneumonia prevalence), so every site has its own train, validation
and test data, disjoint from every other site's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from common.federation_config import ConfigError, FederationConfig
from common.image_tensors import to_model_input
from common.medmnist_files import SPLITS, find_medmnist_file, load_medmnist
from common.site_partition import binary_class_probs, partition_by_class_probs


@dataclass(frozen=True)
class SiteData:
    """One site's images (N, C, S, S) in [0, 1] and labels (N,) per split."""

    name: str
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.images["train"].shape[1]


def site_name(index: int) -> str:
    return f"site-{index}"


def _class_probs(cfg: FederationConfig, num_classes: int) -> np.ndarray:
    if num_classes != 2:
        raise ConfigError(
            f"{cfg.dataset} has {num_classes} classes; prevalence-based site splits need a "
            "binary task"
        )
    return binary_class_probs(list(cfg.prevalences))


@functools.lru_cache(maxsize=2)
def load_federation(cfg: FederationConfig) -> tuple[SiteData, ...]:
    """Every simulated site's data for ``cfg`` (deterministic in ``cfg.seed``)."""
    if len(cfg.prevalences) != cfg.num_sites:
        raise ConfigError(
            f"prevalences lists {len(cfg.prevalences)} values for {cfg.num_sites} simulated "
            "sites; give one per site"
        )
    splits = load_medmnist(find_medmnist_file(cfg.dataset, cfg.data_dir or None))
    probs = _class_probs(cfg, splits.num_classes)
    rng = np.random.default_rng(cfg.seed)
    try:
        per_split = {s: partition_by_class_probs(splits.labels[s], probs, rng) for s in SPLITS}
    except ValueError as exc:
        raise ConfigError(
            f"cannot split {splits.source.name} into {cfg.num_sites} sites with prevalences "
            f"{list(cfg.prevalences)}: {exc}"
        ) from exc
    sites = []
    for i in range(cfg.num_sites):
        images = {s: to_model_input(splits.images[s][per_split[s][i]], cfg.image_size)
                  for s in SPLITS}
        labels = {s: torch.from_numpy(splits.labels[s][per_split[s][i]]) for s in SPLITS}
        sites.append(SiteData(site_name(i), images, labels, splits.num_classes))
    return tuple(sites)
