"""Development credentials: a CA-signed SuperLink certificate and keys Flower accepts."""

from __future__ import annotations

import ipaddress
import os
import re
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

from fedshift_cli import main
from server import dev_credentials
from server.dev_credentials import CredentialsExistError, make_credentials, make_site_key


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


def test_a_fresh_private_key_is_0600_even_with_umask_0(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        creds = make_credentials(tmp_path / "creds", ["site-a"])
    finally:
        os.umask(old_umask)
    for private in (creds.server_key, tmp_path / "creds" / "ca.key", creds.site_keys["site-a"][0]):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert stat.S_IMODE(creds.site_keys["site-a"][1].stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["ca.key", "server.key", "site-a.key"])
def test_an_existing_file_at_a_private_key_path_is_refused_and_kept(
        tmp_path: Path, name: str) -> None:
    existing = tmp_path / name
    existing.write_bytes(b"an old key somebody relies on\n")
    existing.chmod(0o644)
    fix = rf"{re.escape(name)}.*Remove.*another directory"
    with pytest.raises(CredentialsExistError, match=fix):
        make_credentials(tmp_path, ["site-a"])
    assert existing.read_bytes() == b"an old key somebody relies on\n"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing else written


def test_the_command_refuses_to_replace_a_key_and_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "site-a.key"
    existing.write_bytes(b"an old key somebody relies on\n")
    assert main(["credentials", str(tmp_path), "--site", "site-a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedshift: error: ") and "site-a.key" in err
    assert existing.read_bytes() == b"an old key somebody relies on\n"


def test_a_symlink_at_a_key_path_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere" / "authorized_file"
    victim.parent.mkdir()
    victim.write_bytes(b"not yours\n")
    victim.chmod(0o644)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "server.key").symlink_to(victim)
    (creds / "site-a.key").symlink_to(tmp_path / "dangling")
    with pytest.raises(CredentialsExistError, match=re.escape("server.key")):
        make_credentials(creds, ["site-a"])
    with pytest.raises(CredentialsExistError, match=re.escape("site-a.key")):
        make_site_key(creds, "site-a")
    with pytest.raises(CredentialsExistError, match=re.escape("server.key")):
        dev_credentials._write(creds / "server.key", b"secret", private=True)
    assert victim.read_bytes() == b"not yours\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not (tmp_path / "dangling").exists()


def test_credentials_are_not_remade_over_old_ones(tmp_path: Path) -> None:
    first = make_credentials(tmp_path, ["site-a"])
    ca = first.ca_certificate.read_bytes()
    with pytest.raises(CredentialsExistError, match=re.escape("ca.key")):
        make_credentials(tmp_path, ["site-a"])
    assert first.ca_certificate.read_bytes() == ca
    more = make_credentials(tmp_path / "more", ["site-b"])  # another directory works
    assert more.site_keys["site-b"][0].exists()


def test_site_names_that_clash_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_credentials(tmp_path, ["ca"])
    with pytest.raises(ValueError, match="repeat"):
        make_credentials(tmp_path, ["a", "a"])
    assert list(tmp_path.iterdir()) == []
