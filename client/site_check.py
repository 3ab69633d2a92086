"""Everything a site can check alone before it joins a federation.

:func:`check_site` reads the site's data, looks at its budget, its ledger, its
device, its TLS root certificate and its SuperNode key, and gives one
:class:`CheckResult` per item: ``ok``, ``warning`` (works, but look at it) or
``fail`` (the SuperNode would not work, or would release nothing).
"""

from __future__ import annotations

import base64
import datetime
import enum
import hashlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.privacy_ledger import PARTS, LedgerError, PrivacyLedger
from client.site_config import SiteConfig
from common.data.site_loader import SiteImages, load_site_images
from common.data.splits import POOL, SITE_SPLITS, DataFileError

# Images are decoded at this size for the check (the run's size is the server's).
CHECK_IMAGE_SIZE = 32
EPSILON_WARN_ABOVE = 10.0
CERT_WARN_DAYS = 30
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_SHOWN_SKIPS = 3


class Verdict(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    """One checked item: what, the verdict and a message a person can act on."""

    item: str
    verdict: Verdict
    message: str


def _data(config: SiteConfig) -> tuple[list[CheckResult], SiteImages | None]:
    where = f"{config.data.path} ({config.data.format})"
    try:
        site = load_site_images(config.data.path, config.data.format, config.data.channels,
                                CHECK_IMAGE_SIZE, config.name)
    except DataFileError as exc:
        return [CheckResult("data", Verdict.FAIL, str(exc))], None
    counts = {s: len(x) for s, x in site.data.images.items()}
    classes = ", ".join(f"{i}={n}" for i, n in enumerate(site.class_names))
    shown = ", ".join(f"{s} {n}" for s, n in counts.items())
    results = []
    if len(site.class_names) < 2:
        results.append(CheckResult("data", Verdict.FAIL,
                                   f"{where}: one class ({classes}); a classifier needs two or "
                                   "more class folders (an empty folder keeps a class)"))
    elif not counts["train"]:
        results.append(CheckResult("data", Verdict.FAIL,
                                   f"{where}: no training image ({shown})"))
    else:
        empty = [s for s in ("val", "test") if not counts[s]]
        results.append(CheckResult(
            "data", Verdict.WARNING if empty else Verdict.OK,
            f"{where}: {len(site.class_names)} classes ({classes}); images {shown}"
            + (f"; {' and '.join(empty)} empty: evaluation / shift summaries there will fail"
               if empty else ""),
        ))
    train_labels = site.data.labels["train"]
    absent = [n for i, n in enumerate(site.class_names) if not (train_labels == i).any()]
    if absent and counts["train"]:
        results.append(CheckResult("classes", Verdict.WARNING,
                                   f"no training image of class(es) {', '.join(absent)}"))
    (h0, w0), (h1, w1) = site.min_size, site.max_size
    results.append(CheckResult("image sizes", Verdict.OK,
                               f"height {h0}..{h1}, width {w0}..{w1} pixels (resized to the "
                               "run's image size; aspect ratio not kept)"))
    if site.skipped:
        per_split = ", ".join(f"{s} {site.skipped_in(s)}" for s in SITE_SPLITS
                              if site.skipped_in(s))
        examples = "; ".join(f"{s.path}: {s.reason}" for s in site.skipped[:_SHOWN_SKIPS])
        results.append(CheckResult("skipped files", Verdict.WARNING,
                                   f"{len(site.skipped)} unreadable files skipped ({per_split}),"
                                   f" e.g. {examples}"))
    else:
        results.append(CheckResult("skipped files", Verdict.OK, "none"))
    if POOL not in counts and config.policy.shift_summaries:
        where = ("a MedMNIST file holds none" if config.data.format == "medmnist"
                 else "the tree has no deploy/ folder")
        results.append(CheckResult("deployment pool", Verdict.WARNING,
                                   f"no unlabelled deployment pool ({where}): label shift of "
                                   "the site's deployment data cannot be estimated"))
    return results, site


def _budget(config: SiteConfig, site: SiteImages | None) -> CheckResult:
    eps, delta = config.privacy.epsilon, config.privacy.delta
    what = f"epsilon {eps:g}, delta {delta:g}, clip {config.privacy.clip:g}"
    if site is not None and len(site.data.labels["train"]):
        n = len(site.data.labels["train"])
        if delta >= 1 / n:
            return CheckResult("budget", Verdict.FAIL,
                               f"{what}: delta must be well below 1/n = {1 / n:.2g} for {n} "
                               "training images (a mechanism with delta >= 1/n may reveal a "
                               "record outright); lower [privacy] delta")
    if eps > EPSILON_WARN_ABOVE:
        return CheckResult("budget", Verdict.WARNING,
                           f"{what}: epsilon above {EPSILON_WARN_ABOVE:g} gives little "
                           "protection; is that what the site's privacy review agreed?")
    return CheckResult("budget", Verdict.OK, what)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _ledger(config: SiteConfig) -> CheckResult:
    path = config.privacy.ledger
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            return CheckResult("ledger", Verdict.FAIL,
                               f"{path} is not a file this user can read and write")
        try:
            ledger = PrivacyLedger(path, config.privacy.epsilon, config.privacy.delta,
                                   config.policy.composition)
            spent = ledger.epsilon_spent()
            parts = f"{config.policy.composition} composition; by part " + ", ".join(
                f"{p} {ledger.epsilon_spent(p):.3g}" for p in PARTS)
        except LedgerError as exc:
            return CheckResult("ledger", Verdict.FAIL, str(exc))
        if spent >= config.privacy.epsilon - 1e-9:
            return CheckResult("ledger", Verdict.FAIL,
                               f"{path}: epsilon {spent:.4g} spent of {config.privacy.epsilon:g}"
                               f" ({parts}): no budget left, every release would be refused")
        return CheckResult("ledger", Verdict.OK,
                           f"{path}: epsilon {spent:.4g} spent of {config.privacy.epsilon:g} "
                           f"({parts}); {len(ledger.entries())} releases recorded")
    if config.privacy.ledger_must_exist:
        return CheckResult("ledger", Verdict.FAIL,
                           f"{path} is missing but ledger_must_exist = true: restore it from "
                           "backup (a lost ledger would count as nothing spent)")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return CheckResult("ledger", Verdict.FAIL,
                           f"{path} cannot be created: {existing} is not a writable folder")
    return CheckResult("ledger", Verdict.OK, f"{path} will be created at the first release")


def _device(config: SiteConfig) -> CheckResult:
    visible = torch.cuda.is_available()
    gpu = f"CUDA GPU {torch.cuda.get_device_name(0)}" if visible else "no CUDA GPU visible"
    if config.device == "cuda" and not visible:
        return CheckResult("device", Verdict.FAIL,
                           "device = \"cuda\" but torch sees no CUDA GPU (driver, "
                           "CUDA_VISIBLE_DEVICES, torch build?); or set device = \"cpu\"")
    if config.device == "auto":
        return CheckResult("device", Verdict.OK, f"auto: {gpu}, so {'cuda' if visible else 'cpu'}")
    return CheckResult("device", Verdict.OK, f"{config.device} ({gpu})")


def _ca_certificate(config: SiteConfig) -> CheckResult:
    path = config.superlink.ca_certificate
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return CheckResult("CA certificate", Verdict.FAIL, f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        return CheckResult("CA certificate", Verdict.FAIL,
                           f"{path} is not a PEM certificate ({exc})")
    now = datetime.datetime.now(datetime.UTC)
    first = certs[0]
    subject = first.subject.rfc4514_string()
    expired = [c for c in certs if not c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    if expired:
        return CheckResult("CA certificate", Verdict.FAIL,
                           f"{path}: {expired[0].subject.rfc4514_string()} is valid only "
                           f"{expired[0].not_valid_before_utc:%Y-%m-%d} to "
                           f"{expired[0].not_valid_after_utc:%Y-%m-%d}")
    soonest = min(c.not_valid_after_utc for c in certs)
    verdict = (Verdict.WARNING if soonest - now < datetime.timedelta(days=CERT_WARN_DAYS)
               else Verdict.OK)
    return CheckResult("CA certificate", verdict,
                       f"{path}: {len(certs)} certificate(s), {subject}, valid until "
                       f"{soonest:%Y-%m-%d}")


def _fingerprint(key: ec.EllipticCurvePrivateKey) -> str:
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _private_key(config: SiteConfig) -> CheckResult:
    path = config.superlink.private_key
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        return CheckResult("SuperNode key", Verdict.FAIL, f"cannot read {path}: {exc.strerror}")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        hint = ("it is a PEM key; flower-supernode reads OpenSSH format: convert it with "
                f"`ssh-keygen -p -N '' -f {path}`" if b"-----BEGIN" in data
                and b"OPENSSH" not in data else f"not an unencrypted OpenSSH private key ({exc})")
        return CheckResult("SuperNode key", Verdict.FAIL,
                           f"{path}: {hint}; make one with `ssh-keygen -t ecdsa -b 384 -N '' "
                           "-f KEY`")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return CheckResult("SuperNode key", Verdict.FAIL,
                           f"{path} is a {type(key).__name__.removeprefix('_')}; Flower needs an "
                           "EC key on a NIST curve: `ssh-keygen -t ecdsa -b 384 -N '' -f KEY`")
    if key.curve.name not in NIST_CURVES:
        return CheckResult("SuperNode key", Verdict.FAIL,
                           f"{path}: curve {key.curve.name} is not a NIST curve "
                           f"({', '.join(NIST_CURVES)})")
    what = f"{path}: EC {key.curve.name}, public key {_fingerprint(key)}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return CheckResult("SuperNode key", Verdict.WARNING,
                           f"{what}; others can read it (mode {stat.S_IMODE(mode):o}): "
                           f"`chmod 600 {path}`")
    return CheckResult("SuperNode key", Verdict.OK, what)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _clientapp_port(config: SiteConfig) -> CheckResult:
    port = config.superlink.clientapp_port
    if _port_in_use(port):
        return CheckResult("ClientApp port", Verdict.WARNING,
                           f"127.0.0.1:{port} is in use (this site's SuperNode already running, "
                           "or another one? give each its own [superlink] clientapp_port)")
    return CheckResult("ClientApp port", Verdict.OK, f"127.0.0.1:{port} is free")


def _pinned_code(config: SiteConfig) -> CheckResult:
    path = config.superlink.trusted_entities
    if path is None:
        return CheckResult("app publishers", Verdict.WARNING,
                           "no [superlink] trusted_entities: this site runs whatever ClientApp "
                           "code the server's app bundle holds, including the code that "
                           "enforces its budget; pin the publishers you trust")
    if not path.is_file():
        return CheckResult("app publishers", Verdict.FAIL,
                           f"trusted_entities {path} is not a readable file")
    return CheckResult("app publishers", Verdict.OK,
                       f"only app bundles signed by the keys in {path} run here")


def check_site(config: SiteConfig) -> list[CheckResult]:
    """Check what the site can check alone; prints nothing.

    Parameters
    ----------
    config : SiteConfig
        The site's settings (already parsed: see
        :func:`client.site_config.load_site_config`).

    Returns
    -------
    list[CheckResult]
        In order: config; data, then (when the data could be read) classes
        (only when a class has no training image), image sizes, skipped files and
        deployment pool (only when missing and shift summaries are allowed);
        budget, ledger, device, CA certificate, SuperNode key, ClientApp port,
        app publishers.
    """
    results = [CheckResult("config", Verdict.OK,
                           f"{config.source}: site {config.name}, SuperLink "
                           f"{config.superlink.address}")]
    data_results, site = _data(config)
    results.extend(data_results)
    results.extend([_budget(config, site), _ledger(config), _device(config),
                    _ca_certificate(config), _private_key(config), _clientapp_port(config),
                    _pinned_code(config)])
    return results
