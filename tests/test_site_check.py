"""What a site checks alone: data, budget, ledger, device, CA certificate, SuperNode key."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from client.privacy_ledger import PrivacyLedger
from client.site_check import CheckResult, Verdict, check_site
from client.site_cli import supernode_command
from client.site_config import SiteConfig, load_site_config
from common.privacy_accounting import GaussianRelease
from tests.site_files import site_toml, write_ca_certificate, write_site


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(tmp_path: Path, **toml: object) -> SiteConfig:
    return load_site_config(write_site(tmp_path, site_toml(port=_free_port(), **toml)))


def _by_item(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.item: r for r in results}


def test_a_complete_site_passes_every_check(tmp_path: Path) -> None:
    results = _by_item(check_site(_site(tmp_path)))
    assert list(results) == ["config", "data", "image sizes", "skipped files", "budget",
                             "ledger", "device", "CA certificate", "SuperNode key",
                             "ClientApp port", "app publishers"]
    assert all(r.verdict is Verdict.OK for r in results.values()
               if r.item != "app publishers"), results
    # Without pinned publishers the site runs whatever code the server's bundle holds.
    assert results["app publishers"].verdict is Verdict.WARNING
    assert "enforces its budget" in results["app publishers"].message
    assert "2 classes (0=a, 1=b)" in results["data"].message
    assert "train 28, val 6, test 6, pool 3" in results["data"].message
    assert "height 20..26, width 20..24" in results["image sizes"].message
    assert "will be created" in results["ledger"].message
    assert "EC secp384r1, public key SHA256:" in results["SuperNode key"].message
    assert "CN=test CA" in results["CA certificate"].message


def test_skipped_files_and_missing_pool_are_warnings(tmp_path: Path) -> None:
    config = load_site_config(write_site(tmp_path, site_toml(port=_free_port()), pool=0))
    (config.data.path / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    results = _by_item(check_site(config))
    assert results["skipped files"].verdict is Verdict.WARNING
    assert "1 unreadable files skipped" in results["skipped files"].message
    assert "broken.png" in results["skipped files"].message
    assert results["deployment pool"].verdict is Verdict.WARNING
    assert "no deploy/ folder" in results["deployment pool"].message


def test_unreadable_data_fails(tmp_path: Path) -> None:
    results = _by_item(check_site(_site(tmp_path, data_path="missing")))
    assert results["data"].verdict is Verdict.FAIL
    assert "missing is not a folder" in results["data"].message
    assert results["budget"].verdict is Verdict.OK  # the other checks still run


def test_delta_above_one_over_n_fails_and_large_epsilon_warns(tmp_path: Path) -> None:
    results = _by_item(check_site(_site(tmp_path / "a", delta=0.05)))
    assert results["budget"].verdict is Verdict.FAIL
    assert "28 training images" in results["budget"].message
    results = _by_item(check_site(_site(tmp_path / "b", epsilon=20.0)))
    assert results["budget"].verdict is Verdict.WARNING


def test_ledger_reports_what_is_spent_and_fails_when_nothing_is_left(tmp_path: Path) -> None:
    config = _site(tmp_path, epsilon=8.0)
    ledger = PrivacyLedger(config.privacy.ledger, 8.0, config.privacy.delta)
    ledger.charge(GaussianRelease(2.0, 0.1, 50), "run", 1, "training")
    spent = ledger.epsilon_spent()
    result = _by_item(check_site(config))["ledger"]
    assert result.verdict is Verdict.OK
    assert f"epsilon {spent:.4g} spent of 8" in result.message
    assert "1 releases recorded" in result.message
    tight = load_site_config(write_site(tmp_path / "tight", site_toml(
        port=_free_port(), epsilon=spent / 2)))
    PrivacyLedger(tight.privacy.ledger, 8.0, tight.privacy.delta).charge(
        GaussianRelease(2.0, 0.1, 50), "run", 1, "training")
    result = _by_item(check_site(tight))["ledger"]
    assert result.verdict is Verdict.FAIL and "no budget left" in result.message


def test_ledger_at_another_delta_or_in_an_unwritable_place_fails(tmp_path: Path) -> None:
    config = _site(tmp_path)
    PrivacyLedger(config.privacy.ledger, 8.0, 1e-6).charge(
        GaussianRelease(2.0, 0.1, 50), "run", 1, "training")
    assert "accounts at delta=1e-06" in _by_item(check_site(config))["ledger"].message
    blocked = tmp_path / "b"
    blocked.mkdir()
    (blocked / "state").write_text("a file where the ledger folder should be")
    result = _by_item(check_site(_site(blocked)))["ledger"]
    assert result.verdict is Verdict.FAIL and "is not a writable folder" in result.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the verdict without a GPU")
def test_cuda_without_a_gpu_fails(tmp_path: Path) -> None:
    result = _by_item(check_site(_site(tmp_path, extra_top='device = "cuda"\n')))["device"]
    assert result.verdict is Verdict.FAIL and "no CUDA GPU" in result.message


def test_missing_garbage_or_expired_ca_certificate_fails(tmp_path: Path) -> None:
    config = _site(tmp_path)
    ca = config.superlink.ca_certificate
    ca.unlink()
    result = _by_item(check_site(config))["CA certificate"]
    assert result.verdict is Verdict.FAIL and "cannot read" in result.message
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert _by_item(check_site(config))["CA certificate"].verdict is Verdict.FAIL
    write_ca_certificate(ca, days=10, start_days_ago=20)
    result = _by_item(check_site(config))["CA certificate"]
    assert result.verdict is Verdict.FAIL and "is valid only" in result.message
    write_ca_certificate(ca, days=10, start_days_ago=1)
    assert _by_item(check_site(config))["CA certificate"].verdict is Verdict.WARNING


def test_missing_or_unusable_supernode_key_fails(tmp_path: Path) -> None:
    config = _site(tmp_path)
    key_path = config.superlink.private_key
    key_path.unlink()
    result = _by_item(check_site(config))["SuperNode key"]
    assert result.verdict is Verdict.FAIL and "cannot read" in result.message

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    key_path.write_bytes(pem)
    result = _by_item(check_site(config))["SuperNode key"]
    assert result.verdict is Verdict.FAIL and "reads OpenSSH format" in result.message

    key_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    result = _by_item(check_site(config))["SuperNode key"]
    assert result.verdict is Verdict.FAIL and "needs an EC key on a NIST curve" in result.message

    key_path.write_bytes(b"random bytes")
    assert _by_item(check_site(config))["SuperNode key"].verdict is Verdict.FAIL


def test_key_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    config = _site(tmp_path)
    config.superlink.private_key.chmod(0o644)
    result = _by_item(check_site(config))["SuperNode key"]
    assert result.verdict is Verdict.WARNING and "chmod 600" in result.message


def test_busy_clientapp_port_is_a_warning(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = load_site_config(write_site(tmp_path, site_toml(port=port)))
        result = _by_item(check_site(config))["ClientApp port"]
    assert result.verdict is Verdict.WARNING and str(port) in result.message


def test_pinned_publishers_pass_and_reach_the_supernode(tmp_path: Path) -> None:
    config = _site(tmp_path)
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text("fpk_1: 'ssh-ed25519 AAAA test'\n")
    pinned = dataclasses.replace(config, superlink=dataclasses.replace(
        config.superlink, trusted_entities=trusted))
    assert _by_item(check_site(pinned))["app publishers"].verdict is Verdict.OK
    command = supernode_command(pinned)
    assert command[command.index("--trusted-entities") + 1] == str(trusted)
    assert "--trusted-entities" not in supernode_command(config)


def test_a_missing_ledger_the_file_says_exists_fails_the_check(tmp_path: Path) -> None:
    config = _site(tmp_path)
    must = dataclasses.replace(config, privacy=dataclasses.replace(
        config.privacy, ledger_must_exist=True))
    result = _by_item(check_site(must))["ledger"]
    assert result.verdict is Verdict.FAIL and "restore it from backup" in result.message
