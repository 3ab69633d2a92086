"""Who this site is: its data, its ledger, its budget and its device.

Resolved from the run's :class:`FederationConfig` and the node config of the
SuperNode (or simulated node) the ClientApp runs on. A simulated site is picked
by ``partition-id`` and runs under the name of its data (the scenario's site
name, or ``site-<index>``), so the server's records, its ledger and the
simulation's results all find it by one name; a deployed site (node config with ``data-path``, as
``fedshift site run`` sets it from the site's TOML) reads its own data and must
set its own budget and ledger (``epsilon``, ``delta``, ``ledger-path``); it
refuses runs with DP turned off, so the server can neither raise the budget nor
move the ledger (a fresh ledger would forget what was spent). Wherever the node
config sets ``epsilon``, ``delta`` or ``clip``, they replace the run config's.

What the site releases and the limits on what a run may ask of it are its
:class:`client.release_policy.SitePolicy`: from the node config for a deployed
site, from the simulation for a simulated one; a run beyond the limits is
refused before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client.privacy_ledger import PrivacyLedger
from client.release_policy import SitePolicy
from client.reply_archive import ReplyArchive
from common.data.federation import load_federation
from common.data.site_loader import load_site_images
from common.data.splits import SiteData
from common.federation_config import ConfigError, FederationConfig
from common.messages import SITE_NAME_PATTERN

SiteLoader = Callable[[FederationConfig], Sequence[SiteData]]

# Node config keys a deployed site must set itself (the budget belongs to the site).
DEPLOYED_REQUIRED = ("site-name", "data-format", "epsilon", "delta", "ledger-path")


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site needs to answer one message.

    ``cfg`` is the run's config with the site's own ``epsilon``, ``delta`` and
    ``clip`` in force; ``skipped_images`` counts the site's image files that could
    not be read (0 for simulated sites); ``policy`` says what the site releases;
    ``archive`` keeps the replies it sent (runs with DP).
    """

    name: str
    cfg: FederationConfig
    data: SiteData
    ledger: PrivacyLedger | None
    device: torch.device
    run_key: str
    policy: SitePolicy = field(default_factory=SitePolicy)
    archive: ReplyArchive | None = None
    skipped_images: int = 0

    @property
    def files_dir(self) -> Path:
        """Where the site keeps its own files for a run: beside its ledger."""
        return self.ledger.path.parent if self.ledger is not None else Path(self.cfg.state_dir)


def resolve_device(value: str) -> torch.device:
    """``cuda``, ``cpu`` or ``auto`` (CUDA when torch sees a GPU) as a torch device."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda was requested but no CUDA GPU is visible to torch")
    if value not in ("cuda", "cpu"):
        raise ConfigError(f"device must be auto, cuda or cpu, got {value!r}")
    return torch.device(value)


def simulated_ledger_path(cfg: FederationConfig, name: str) -> Path:
    """Where a site whose node config names no ledger keeps it: under the run's state-dir."""
    return Path(cfg.state_dir) / "ledgers" / f"{name}.json"


def _site_budget(cfg: FederationConfig, node_config: dict[str, Any]) -> FederationConfig:
    """The run config with the node's own epsilon, delta and clip (where set) in force."""
    own = {key: float(node_config[key]) for key in ("epsilon", "delta", "clip")
           if key in node_config}
    return cfg.replace(**own) if own else cfg


def _simulated_data(cfg: FederationConfig, node_config: dict[str, Any],
                    load_sites: SiteLoader) -> tuple[str, SiteData, int]:
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has neither data-path (a deployed site: run it with `fedshift site "
            "run site.toml`) nor partition-id (a simulated site, set by Flower's simulation "
            "engine)"
        )
    index = int(node_config["partition-id"])
    if not 0 <= index < cfg.num_sites:
        raise ConfigError(f"partition-id {index} is outside 0..{cfg.num_sites - 1}")
    data = load_sites(cfg)[index]
    return data.name, data, 0


def _deployed_data(cfg: FederationConfig, node_config: dict[str, Any]
                   ) -> tuple[str, SiteData, int]:
    missing = [key for key in DEPLOYED_REQUIRED if key not in node_config]
    if missing:
        raise ConfigError(
            f"node config sets data-path but not {', '.join(missing)}: a deployed site sets "
            "its own name, data format and budget (`fedshift site run site.toml` passes them)"
        )
    if not cfg.dp:
        raise ConfigError(
            "the run turns DP off (dp = false) but this site releases training updates only "
            "under DP; the site refuses the run"
        )
    name = str(node_config["site-name"])
    loaded = load_site_images(Path(str(node_config["data-path"])),
                              str(node_config["data-format"]),
                              int(node_config.get("channels", 1)), cfg.image_size, name)
    return name, loaded.data, len(loaded.skipped)


def resolve_site(cfg: FederationConfig, node_config: dict[str, Any], run_key: str,
                 load_sites: SiteLoader = load_federation,
                 policy: SitePolicy | None = None) -> SiteRuntime:
    """Build the site's runtime.

    Parameters
    ----------
    cfg : FederationConfig
        The run's config.
    node_config : dict
        The node's config: ``data-path`` for a deployed site (see
        :meth:`client.site_config.SiteConfig.node_config`), else ``partition-id``.
    run_key : str
        Identifies the run in the ledger.
    load_sites : SiteLoader (default: load_federation)
        The simulated sites' data for a config (simulated sites only).
    policy : SitePolicy or None (default: None)
        A simulated site's policy; None: the node config's (defaults where it
        sets none). A deployed site always uses its node config's.

    Raises
    ------
    ConfigError
        When the node config is unusable or does not fit the run.
    DataFileError
        When a deployed site's data cannot be read.
    LedgerError
        When the ledger cannot be read or accounts at another delta.
    """
    cfg = _site_budget(cfg, node_config)
    deployed = "data-path" in node_config
    if deployed or policy is None:
        policy = SitePolicy.from_node_config(node_config)
    policy.check_run(cfg)
    if deployed:
        name, data, skipped = _deployed_data(cfg, node_config)
    else:
        name, data, skipped = _simulated_data(cfg, node_config, load_sites)
    if not SITE_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"site name {name!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit (it names the site's files)")
    if data.num_classes > cfg.num_classes or data.in_channels != cfg.in_channels:
        raise ConfigError(
            f"site data has {data.num_classes} classes and {data.in_channels} channels but the "
            f"run expects num-classes={cfg.num_classes}, in-channels={cfg.in_channels}"
        )
    ledger = archive = None
    if cfg.dp:
        path = Path(node_config.get("ledger-path") or simulated_ledger_path(cfg, name))
        ledger = PrivacyLedger(path, cfg.epsilon, cfg.delta, policy.composition,
                               policy.ledger_must_exist)
        archive = ReplyArchive(path.parent / "replies" / f"{name}-{run_key}")
    return SiteRuntime(
        name=name, cfg=cfg, data=data, ledger=ledger,
        device=resolve_device(str(node_config.get("device", "auto"))), run_key=run_key,
        policy=policy, archive=archive, skipped_images=skipped,
    )
