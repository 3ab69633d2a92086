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

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Credentials:
    """Paths of the files :func:`make_credentials` wrote."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]
    """Per site: (private key, public key), both in OpenSSH format."""


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


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
    """Write ``<site>.key`` and ``<site>.pub`` (EC P-384, OpenSSH format) in ``directory``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"{site}.key", directory / f"{site}.pub"
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
        Where the files go (created when missing; existing files are replaced).
    sites : sequence of str
        Site names; each gets ``<name>.key`` and ``<name>.pub``.
    hosts : sequence of str (default: ())
        Host names or IP addresses the SuperLink is reached at, besides loopback.
    days : int (default: 365)
        Validity of the certificates.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    for site in sites:
        if not site or "/" in site or site.startswith("."):
            raise ValueError(f"site name {site!r} cannot be used as a file name")
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
    return Credentials(
        ca_certificate=directory / CA_CERT, server_certificate=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        site_keys={site: make_site_key(directory, site) for site in sites},
    )
