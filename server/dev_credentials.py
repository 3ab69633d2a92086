"""Development credentials for a TLS federation with SuperNode authentication.

Makes, in one directory:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` off
  the network; sites need ``ca.crt`` only);
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA,
  valid for the host names and IP addresses given (``localhost`` and the loopback
  addresses always);
- ``<site>.key`` / ``<site>.pub`` per site: the SuperNode's EC P-384 key pair in
  OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read them.

These are for trying fedshift out and for tests. A hospital's own PKI should
issue the production certificates; the key pairs may be made the same way or
with ``ssh-keygen -t ecdsa -b 384``.

Files are created, never replaced: each is opened with exclusive create and
without following symbolic links, private keys with mode 0600 whatever the
umask. When any file to be written already exists (a symbolic link included),
nothing is written and :class:`CredentialsExistError` names it: old keys may
already be registered or handed out, so replacing them silently would be wrong,
and a file or link planted at a key's path must not receive the key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic_files import fsync_directory

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class CredentialsExistError(FileExistsError):
    """A credentials file to be written already exists; nothing was replaced."""


@dataclass(frozen=True)
class Credentials:
    """Paths of the files :func:`make_credentials` wrote."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]
    """Per site: (private key, public key), both in OpenSSH format."""


def _existing_error(paths: Sequence[Path]) -> CredentialsExistError:
    names = ", ".join(str(p) for p in paths)
    return CredentialsExistError(
        f"refusing to overwrite existing credentials: {names}. Remove "
        f"{'it' if len(paths) == 1 else 'them'} (old keys may still be registered at the "
        "SuperLink or held by sites) or choose another directory"
    )


def _refuse_existing(paths: Iterable[Path]) -> None:
    """Raise before anything is written when any of ``paths`` exists (a dangling link too)."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        raise _existing_error(existing)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` holding ``data``: exclusive create, no symlink followed, durable.

    Private keys get mode 0600 exactly; public files 0644 less the umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise _existing_error([path]) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            if private:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # the file this call created, half written
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK_NAMES, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(subject: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, days: int, is_ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    return builder.sign(signer, hashes.SHA256())


def make_site_key(directory: Path, site: str) -> tuple[Path, Path]:
    """Write ``<site>.key`` and ``<site>.pub`` (EC P-384, OpenSSH format) in ``directory``.

    Raises
    ------
    CredentialsExistError
        When either file exists already (nothing is written then).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"{site}.key", directory / f"{site}.pub"
    _refuse_existing([private, public])
    _write(private, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n",
           private=False)
    return private, public


def make_credentials(directory: Path, sites: Sequence[str], hosts: Sequence[str] = (),
                     days: int = 365) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and a key pair per site.

    Parameters
    ----------
    directory : Path
        Where the files go (created when missing). Existing files are never replaced.
    sites : sequence of str
        Site names; each gets ``<name>.key`` and ``<name>.pub``.
    hosts : sequence of str (default: ())
        Host names or IP addresses the SuperLink is reached at, besides loopback.
    days : int (default: 365)
        Validity of the certificates.

    Raises
    ------
    CredentialsExistError
        When any of the files exists already, a symbolic link included; nothing is
        written then. Remove the old files or choose another directory.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    for site in sites:
        if not site or "/" in site or site.startswith("."):
            raise ValueError(f"site name {site!r} cannot be used as a file name")
        if site in ("ca", "server"):
            owner = "CA" if site == "ca" else "SuperLink"
            raise ValueError(f"site name {site!r} is reserved ({site}.key holds the {owner}'s key)")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names repeat: {list(sites)}")
    _refuse_existing([directory / name for name in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT)]
                     + [directory / f"{site}{ext}" for site in sites for ext in (".key", ".pub")])
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshift development CA")])
    ca_cert = _certificate("fedshift development CA", ca_key.public_key(), ca_name, ca_key,
                           days, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(hosts[0] if hosts else "localhost", server_key.public_key(),
                               ca_name, ca_key, days, is_ca=False, hosts=hosts)
    _write(directory / CA_KEY, _pem_key(ca_key), private=True)
    _write(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(directory / SERVER_KEY, _pem_key(server_key), private=True)
    _write(directory / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM),
           private=False)
    site_keys = {site: make_site_key(directory, site) for site in sites}
    fsync_directory(directory)
    return Credentials(
        ca_certificate=directory / CA_CERT, server_certificate=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY, site_keys=site_keys,
    )
