"""A hospital site's own settings, read from its TOML file and checked at the edge.

The file (see ``client/site.example.toml``) names the site, its data, its
privacy budget and ledger, the releases it allows, its device and how its
SuperNode reaches the SuperLink. Relative paths are taken from the file's own
folder. :meth:`SiteConfig.node_config` turns the settings the ClientApp needs into
the flat Flower node config that ``fedshift site run`` passes to
``flower-supernode`` (:mod:`client.site_runtime` reads it).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.privacy_ledger import COMPOSITIONS
from client.release_policy import WEIGHTS, SitePolicy
from common.data.site_loader import FORMATS
from common.federation_config import ConfigError
from common.messages import NON_DP_RELEASES

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CLIENTAPP_PORT = 9094
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MISSING = object()

NodeConfig = dict[str, str | int | float | bool]


class SiteConfigError(ConfigError):
    """The site's TOML file is missing, malformed or has an unusable setting."""


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: where the site's images are and how to read them.

    Parameters
    ----------
    path : Path
        A MedMNIST ``.npz`` file or the root of an image / DICOM tree.
    format : str
        ``medmnist``, ``imagefolder`` or ``dicom``.
    channels : int (default: 1)
        1 (grey) or 3 (RGB): every image is converted to this; the run's
        ``in-channels`` must match.
    """

    path: Path
    format: str
    channels: int = 1


@dataclass(frozen=True)
class PrivacySettings:
    """``[privacy]``: the site's budget, enforced by the site for everything it releases.

    Parameters
    ----------
    epsilon : float
        Budget over all runs recorded in the ledger.
    delta : float
        The delta of the budget; fixed for the life of a ledger.
    clip : float
        Per-sample gradient norm bound of DP-SGD; replaces the run's ``clip``.
    ledger : Path
        The privacy ledger file (created on first use).
    ledger_must_exist : bool (default: False)
        Refuse to run when the ledger file is missing (set it once the site has
        released anything: a lost ledger must not count as nothing spent).
    """

    epsilon: float
    delta: float
    clip: float
    ledger: Path
    ledger_must_exist: bool = False


@dataclass(frozen=True)
class SuperLinkSettings:
    """``[superlink]``: how the site's SuperNode connects.

    Parameters
    ----------
    address : str
        The SuperLink's Fleet API as ``host:port``.
    ca_certificate : Path
        PEM root certificate(s) that verify the SuperLink's TLS certificate.
    private_key : Path
        The SuperNode's authentication key (an EC key on a NIST curve, in
        OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it).
    clientapp_port : int (default: 9094)
        Local port of the SuperNode's runtime API for its ClientApp processes;
        SuperNodes on one machine need distinct ports.
    trusted_entities : Path or None (default: None)
        YAML file of the app publishers' public keys the site trusts (Flower's
        ``--trusted-entities``): the SuperNode then runs only app bundles signed
        by them. None: the site runs whatever code the server's bundle holds,
        including the code that enforces its budget (``site check`` warns).
    """

    address: str
    ca_certificate: Path
    private_key: Path
    clientapp_port: int = DEFAULT_CLIENTAPP_PORT
    trusted_entities: Path | None = None


@dataclass(frozen=True)
class SiteConfig:
    """One site's settings (see the module docstring and ``client/site.example.toml``).

    Parameters
    ----------
    name : str
        The site's name: letters, digits, ``.``, ``_``, ``-`` (at most 64).
    data, privacy, superlink
        The file's tables.
    policy : SitePolicy
        ``[releases]`` and ``[limits]``: what the site releases and what a run
        may ask of it (:class:`client.release_policy.SitePolicy`).
    device : str (default: "auto")
        ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.
    source : Path
        The file the settings were read from.
    """

    name: str
    data: DataSettings
    privacy: PrivacySettings
    policy: SitePolicy
    superlink: SuperLinkSettings
    device: str
    source: Path

    def node_config(self) -> NodeConfig:
        """The Flower node config the ClientApp reads (flat, hyphenated keys)."""
        return {
            "site-name": self.name,
            "data-path": str(self.data.path),
            "data-format": self.data.format,
            "channels": self.data.channels,
            "epsilon": self.privacy.epsilon,
            "delta": self.privacy.delta,
            "clip": self.privacy.clip,
            "ledger-path": str(self.privacy.ledger),
            "device": self.device,
            **self.policy.to_node_config(),
        }


class _Table:
    """Typed reads from one TOML table; every error names the file, the key and the fix."""

    def __init__(self, raw: dict[str, Any], table: str | None, source: Path) -> None:
        self.raw, self.table, self.source = raw, table, source
        self.read: set[str] = set()

    def _where(self, key: str) -> str:
        return f"[{self.table}] {key}" if self.table else key

    def fail(self, key: str, problem: str) -> SiteConfigError:
        shown = f" = {self.raw[key]!r}" if key in self.raw else ""
        return SiteConfigError(f"{self.source}: {self._where(key)}{shown}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, what: str) -> Any:
        self.read.add(key)
        if key not in self.raw:
            if default is _MISSING:
                table = f" to [{self.table}]" if self.table else ""
                raise SiteConfigError(f"{self.source}: {self._where(key)} is missing; add{table} "
                                      f"{key} = {what}")
            return default
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"expected {what}, not a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {what}")
        return value

    def text(self, key: str, what: str, default: Any = _MISSING,
             choices: tuple[str, ...] = ()) -> str:
        value = self.get(key, str, default, what)
        if not value.strip():
            raise self.fail(key, f"must not be empty; expected {what}")
        if choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return value

    def number(self, key: str, what: str, ok: Callable[[float], bool],
               default: Any = _MISSING) -> float:
        value = float(self.get(key, (int, float), default, what))
        if not (math.isfinite(value) and ok(value)):
            raise self.fail(key, f"expected {what}")
        return value

    def integer(self, key: str, what: str, choices: range | tuple[int, ...],
                default: Any = _MISSING) -> int:
        value = self.get(key, int, default, what)
        if value not in choices:
            raise self.fail(key, f"expected {what}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        return self.get(key, bool, default, "true or false")

    def path(self, key: str, what: str) -> Path:
        value = Path(self.text(key, what)).expanduser()
        return Path(os.path.normpath(self.source.parent / value))

    def table_of(self, key: str, required: bool) -> _Table:
        self.read.add(key)
        if key not in self.raw and not required:
            return _Table({}, key, self.source)
        if not isinstance(self.raw.get(key), dict):
            raise SiteConfigError(f"{self.source}: table [{key}] is missing (or not a table); "
                                  "see client/site.example.toml")
        return _Table(self.raw[key], key, self.source)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            known = ", ".join(sorted(self.read))
            where = f"[{self.table}]" if self.table else "the top level"
            raise SiteConfigError(f"{self.source}: unknown setting(s) {', '.join(unknown)} in "
                                  f"{where}; known there: {known}")


def _address(table: _Table) -> str:
    """``host:port`` as flower-supernode's --superlink takes it (IPv6 hosts in brackets)."""
    address = table.text("address", '"host:port" of the SuperLink\'s Fleet API')
    host, _, port = address.rpartition(":")
    if "://" in address or not host.strip("[]") or not port.isdigit() or \
            not 1 <= int(port) <= 65535:
        raise table.fail("address", "expected host:port without a URL prefix, e.g. "
                                    '"fl.example.org:8000" or "[2001:db8::1]:8000"')
    return address


def _policy(top: _Table, ledger_must_exist: bool) -> SitePolicy:
    """``[releases]``, ``[limits]`` and ``[operating_point]`` as the site's policy."""
    defaults = SitePolicy()
    table = top.table_of("releases", required=False)
    non_dp = table.get("non_dp", list, [], "a list of release names, e.g. [\"train-loss\"]")
    unknown = [v for v in non_dp if v not in NON_DP_RELEASES]
    if unknown:
        raise table.fail("non_dp", f"unknown release(s) {unknown}; known: "
                                   f"{', '.join(NON_DP_RELEASES)}")
    kwargs: dict[str, Any] = {
        "non_dp": frozenset(non_dp),
        "weights": table.text("weights", '"equal" or "dp-count"', defaults.weights, WEIGHTS),
        "count_noise": table.number("count_noise", "a noise std > 0, e.g. 10.0",
                                    lambda v: v > 0, defaults.count_noise),
        "max_evaluations": table.integer("max_evaluations", "a whole number >= 0",
                                         range(0, 10**6), defaults.max_evaluations),
        "label_histograms": table.flag("label_histograms", defaults.label_histograms),
        "shift_summaries": table.flag("shift_summaries", defaults.shift_summaries),
        "composition": table.text("composition", '"sequential" or "parallel-parts"',
                                  defaults.composition, COMPOSITIONS),
        "ledger_must_exist": ledger_must_exist,
    }
    table.done()
    table = top.table_of("limits", required=False)
    for key in ("max_image_size", "max_local_epochs", "max_rounds", "max_moment_layers"):
        kwargs[key] = table.integer(key, "a whole number >= 1", range(1, 10**6),
                                    getattr(defaults, key))
    table.done()
    table = top.table_of("operating_point", required=False)
    kwargs["target_sensitivity"] = table.number(
        "target_sensitivity", "a sensitivity in (0, 1), e.g. 0.9, or 0 for the balanced "
        "point", lambda v: 0 <= v < 1, defaults.target_sensitivity)
    kwargs["own_model_epochs"] = table.integer(
        "own_model_epochs", "a whole number of epochs >= 0 (0: no own model)",
        range(0, 10**4), defaults.own_model_epochs)
    kwargs["decide_with_mix"] = table.flag("decide_with_mix", defaults.decide_with_mix)
    table.done()
    return SitePolicy(**kwargs)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site's TOML file.

    Parameters
    ----------
    path : str | Path
        The file; relative paths inside it are taken from its folder.

    Returns
    -------
    SiteConfig
        The checked settings, paths absolute.

    Raises
    ------
    SiteConfigError
        When the file cannot be read or parsed, a required setting is missing, a
        setting is unknown (a typo) or has an unusable value; the message names
        the file, the key, the value and what to write instead.
    """
    source = Path(path).expanduser().absolute()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SiteConfigError(f"cannot read the site config {source}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteConfigError(f"{source} is not valid TOML: {exc}") from None
    top = _Table(raw, None, source)
    name = top.text("name", '"the-site-name"')
    if not _NAME.fullmatch(name):
        raise top.fail("name", "use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit")
    device = top.text("device", '"auto", "cpu" or "cuda"', "auto", DEVICES)

    table = top.table_of("data", required=True)
    data = DataSettings(
        path=table.path("path", '"path/to/images" (a MedMNIST .npz file or an image tree)'),
        format=table.text("format", " or ".join(f'"{f}"' for f in FORMATS), choices=FORMATS),
        channels=table.integer("channels", "1 (grey) or 3 (RGB)", (1, 3), 1),
    )
    table.done()

    table = top.table_of("privacy", required=True)
    privacy = PrivacySettings(
        epsilon=table.number("epsilon", "a finite number > 0 (the site's budget), e.g. 1.0",
                             lambda v: v > 0),
        delta=table.number("delta", "a number in (0, 1), well below 1 / training images, "
                                    "e.g. 1e-5", lambda v: 0 < v < 1),
        clip=table.number("clip", "a finite number > 0 (per-sample gradient norm bound), "
                                  "e.g. 0.1", lambda v: v > 0),
        ledger=table.path("ledger", '"path/to/privacy-ledger.json"'),
        ledger_must_exist=table.flag("ledger_must_exist", False),
    )
    table.done()
    policy = _policy(top, privacy.ledger_must_exist)

    table = top.table_of("superlink", required=True)
    superlink = SuperLinkSettings(
        address=_address(table),
        ca_certificate=table.path("ca_certificate", '"path/to/ca.crt" (PEM)'),
        private_key=table.path("private_key", '"path/to/supernode-key" (OpenSSH EC key)'),
        clientapp_port=table.integer("clientapp_port", "a port number in 1..65535",
                                     range(1, 65536), DEFAULT_CLIENTAPP_PORT),
        trusted_entities=(table.path("trusted_entities", '"path/to/trusted-entities.yaml"')
                          if "trusted_entities" in table.raw else None),
    )
    table.done()
    top.done()
    return SiteConfig(name=name, data=data, privacy=privacy, policy=policy,
                      superlink=superlink, device=device, source=source)
