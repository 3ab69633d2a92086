"""Development credentials: a CA-signed SuperLink certificate and keys Flower accepts."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from flwr.cli.supernode.register import try_load_public_key

from server.dev_credentials import make_credentials
from simulations.cli import main


def test_server_certificate_is_signed_by_the_ca_for_loopback_and_given_hosts(
        tmp_path: Path) -> None:
    creds = make_credentials(tmp_path, ["site-a"], hosts=["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(creds.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.5")}


def test_site_keys_are_a_p384_pair_in_the_formats_flower_reads(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path, ["site-a", "site-b"])
    private_path, public_path = creds.site_keys["site-a"]
    private = load_ssh_private_key(private_path.read_bytes(), password=None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert try_load_public_key(public_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.server_key.stat().st_mode) == 0o600
    other = load_ssh_public_key(creds.site_keys["site-b"][1].read_bytes())
    assert other.public_numbers() != public.public_numbers()


def test_bad_site_names_and_validity_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file name"):
        make_credentials(tmp_path, ["../etc"])
    with pytest.raises(ValueError, match="days"):
        make_credentials(tmp_path, ["a"], days=0)


def test_credentials_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["credentials", str(tmp_path), "--site", "site-a", "--host", "h.org"]) == 0
    out = capsys.readouterr().out
    assert "site-a" in out and str(tmp_path / "ca.crt") in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt", "ca.key", "server.crt", "server.key", "site-a.key", "site-a.pub"]
