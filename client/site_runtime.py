"""Who this site is: its data, its ledger, its budget and its device.

Resolved from the run's :class:`FederationConfig` and the node config of the
SuperNode (or simulated node) the ClientApp runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.privacy_ledger import PrivacyLedger
from common.federated_data import SiteData, load_federation, site_name
from common.federation_config import ConfigError, FederationConfig

SiteLoader = Callable[[FederationConfig], Sequence[SiteData]]


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site needs to answer one message."""

    name: str
    cfg: FederationConfig
    data: SiteData
    ledger: PrivacyLedger | None
    device: torch.device
    allow_metrics: bool
    run_key: str


def _device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda was requested but no CUDA GPU is visible to torch")
    if value not in ("cuda", "cpu"):
        raise ConfigError(f"device must be auto, cuda or cpu, got {value!r}")
    return torch.device(value)


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")


def resolve_site(cfg: FederationConfig, node_config: dict[str, Any], run_key: str,
                 load_sites: SiteLoader = load_federation) -> SiteRuntime:
    """Build the site's runtime; raises ConfigError when the node config is unusable."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has no partition-id: this ClientApp serves simulated sites "
            "(Flower's simulation engine sets partition-id)"
        )
    index = int(node_config["partition-id"])
    if not 0 <= index < cfg.num_sites:
        raise ConfigError(f"partition-id {index} is outside 0..{cfg.num_sites - 1}")
    data = load_sites(cfg)[index]
    if data.num_classes > cfg.num_classes or data.in_channels != cfg.in_channels:
        raise ConfigError(
            f"site data has {data.num_classes} classes and {data.in_channels} channels but the "
            f"run expects num-classes={cfg.num_classes}, in-channels={cfg.in_channels}"
        )
    name = str(node_config.get("site-name", site_name(index)))
    ledger = None
    if cfg.dp:
        path = node_config.get("ledger-path") or Path(cfg.state_dir) / "ledgers" / f"{name}.json"
        ledger = PrivacyLedger(Path(path), float(node_config.get("epsilon", cfg.epsilon)),
                               float(node_config.get("delta", cfg.delta)))
    return SiteRuntime(
        name=name, cfg=cfg, data=data, ledger=ledger,
        device=_device(str(node_config.get("device", "auto"))),
        allow_metrics=_flag(node_config.get("allow-metrics", True)), run_key=run_key,
    )
