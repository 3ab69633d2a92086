"""``fedshift site check|run|unit``: verdict tables, the SuperNode command, the systemd unit."""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client import site_cli
from client.site_cli import (
    _toml_value,
    add_site_parser,
    node_config_arg,
    run_site_command,
    supernode_command,
)
from client.site_config import SiteConfigError, load_site_config
from tests.site_files import site_toml, write_site


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedshift")
    add_site_parser(parser.add_subparsers(dest="command", required=True))
    return run_site_command(parser.parse_args(argv))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    # a folder name with a space and a quote: the node config must still carry the paths
    return write_site(tmp_path / "st mary's", site_toml(port=_free_port()))


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}


def test_dry_run_prints_a_supernode_command_flower_parses_back(
        site_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["site", "run", str(site_file), "--dry-run"]) == 0
    captured = capsys.readouterr()
    worker_line, supernode_line = captured.out.splitlines()
    worker = shlex.split(worker_line)
    assert worker[1:4] == ["-m", "client.site_worker", str(site_file)]
    argv = shlex.split(supernode_line)
    assert argv[0] == "flower-supernode"
    flags = _flags(argv)
    config = load_site_config(site_file)
    assert flags["--superlink"] == "127.0.0.1:9092"
    assert flags["--root-certificates"] == str(site_file.parent / "certs" / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(site_file.parent / "keys" / "supernode")
    assert flags["--isolation"] == "subprocess"
    assert flags["--port"] == str(config.superlink.clientapp_port)
    assert "--insecure" not in argv
    node_config = parse_config_args([flags["--node-config"]])
    assert node_config.pop("worker-socket") == _flags(worker)["--socket"]
    assert node_config.pop("worker-key-file") == _flags(worker)["--key-file"]
    assert node_config == config.node_config()
    assert "OK" in captured.err and "FAIL" not in captured.err  # the checks ran


def test_node_config_values_survive_flowers_parser() -> None:
    node = {"a": "plain", "b": "with 'single' quotes", "c": 'with "double" quotes',
            "d": "C:\\data\\x y", "e": 3, "f": 1e-05, "g": 0.1, "h": True, "i": False,
            "j": "ends.toml"}
    assert parse_config_args([node_config_arg(node)]) == node


def test_values_flower_cannot_carry_are_refused() -> None:
    with pytest.raises(SiteConfigError, match="both quote kinds"):
        _toml_value("data-path", "it's \"odd\"")
    with pytest.raises(SiteConfigError, match="control character"):
        _toml_value("data-path", "line\nbreak")


def test_check_prints_a_table_and_exits_by_the_worst_verdict(
        site_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["site", "check", str(site_file)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("OK") and "config" in table[0]
    assert any(line.split()[1:3] == ["SuperNode", "key"] for line in table)
    (site_file.parent / "keys" / "supernode").unlink()
    assert _run(["site", "check", str(site_file)]) == 1
    assert any(line.startswith("FAIL") and "SuperNode key" in line
               for line in capsys.readouterr().out.splitlines())


def test_run_refuses_to_start_when_a_check_fails(site_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (site_file.parent / "certs" / "ca.crt").unlink()
    assert _run(["site", "run", str(site_file)]) == 1
    assert "not starting the SuperNode" in capsys.readouterr().err


def test_unusable_config_exits_1_naming_the_key(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.toml"
    path.write_text(site_toml().replace("epsilon = 1.0", "epsilon = 0"))
    assert _run(["site", "check", str(path)]) == 1
    assert "[privacy] epsilon = 0" in capsys.readouterr().err


def test_unit_runs_the_site_with_restarts_and_hardening(
        site_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["site", "unit", str(site_file)]) == 0
    unit = capsys.readouterr().out
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if "=" in line and not line.startswith("#"))
    exec_start = shlex.split(lines["ExecStart"])
    assert exec_start[-3:] == ["site", "run", str(site_file)]
    assert Path(exec_start[0]).is_absolute()
    assert lines["Restart"] == "on-failure" and int(lines["RestartSec"]) > 0
    assert lines["NoNewPrivileges"] == "yes" and lines["ProtectSystem"] == "strict"
    assert shlex.split(lines["ReadWritePaths"]) == [str(site_file.parent / "state")]
    assert lines["WorkingDirectory"] == str(site_file.parent)
    assert lines["User"]


def test_without_the_fedshift_script_the_unit_runs_the_command_line_module(
        site_file: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_cli, "_executable", lambda name: None)
    assert _run(["site", "unit", str(site_file)]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines()
                 if "=" in line and not line.startswith("#"))
    assert shlex.split(lines["ExecStart"]) == [sys.executable, "-m", "fedshift_cli", "site",
                                               "run", str(site_file)]


def test_supernode_command_uses_the_given_executable(site_file: Path) -> None:
    argv = supernode_command(load_site_config(site_file), "/opt/venv/bin/flower-supernode")
    assert argv[0] == "/opt/venv/bin/flower-supernode"
