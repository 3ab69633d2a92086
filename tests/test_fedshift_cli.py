"""``fedshift``: every command listed, and a side loaded only when its command is chosen.

Each case runs the console script's entry point (read from pyproject.toml) in a
fresh Python, then lists the fedshift packages it loaded: a hospital's ``fedshift
site ...`` must load nothing from ``simulations`` (nor ``server``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.site_files import site_toml, write_site

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("simulate", "report", "study", "credentials", "site")
SIDES = ("client", "server", "simulations")
CHILD = f"""\
import importlib, json, sys
module, function = sys.argv[1].split(":")
main = getattr(importlib.import_module(module), function)
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SIDES!r})
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def _entry_point() -> str:
    """``module:function`` that the ``fedshift`` console script runs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject["project"]["scripts"]["fedshift"]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh process that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _fedshift(*argv: str) -> tuple[int, str, set[str]]:
    """Run ``fedshift ARGV`` in a fresh Python: its exit code, its output and the
    client/server/simulations modules it loaded."""
    done = _python("-c", CHILD, _entry_point(), *argv)
    *output, last = done.stdout.splitlines()
    report = json.loads(last)
    return report["code"], "\n".join(output), set(report["loaded"])


def _sides(modules: set[str]) -> dict[str, list[str]]:
    return {side: sorted(m for m in modules if m.split(".")[0] == side) for side in SIDES}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_command_and_loads_no_side() -> None:
    code, out, loaded = _fedshift("--help")
    assert code == 0
    listed = [m[1] for line in out.splitlines() if (m := re.match(r" {4}(\w+) ", line))]
    assert listed == list(COMMANDS)
    assert not loaded


def test_site_check_help_loads_nothing_from_simulations() -> None:
    code, out, loaded = _fedshift("site", "check", "--help")
    assert code == 0 and out.startswith("usage: fedshift site check")
    sides = _sides(loaded)
    assert sides["client"]
    assert (sides["simulations"], sides["server"]) == ([], []), "the site loaded these"


def test_site_dry_run_loads_nothing_from_simulations(tmp_path: Path) -> None:
    site_file = write_site(tmp_path / "site", site_toml(port=_free_port()))
    code, out, loaded = _fedshift("site", "run", str(site_file), "--dry-run")
    assert code == 0, out
    assert "flower-supernode" in out
    sides = _sides(loaded)
    assert "client.site_check" in sides["client"]
    assert (sides["simulations"], sides["server"]) == ([], []), "the site loaded these"


def test_the_module_runs_the_same_command_line() -> None:
    """What a site's systemd unit runs where the ``fedshift`` script is not installed."""
    done = _python("-m", "fedshift_cli", "site", "check", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedshift site check")


@pytest.mark.parametrize(("argv", "side"), [
    (("credentials", "--help"), "server"),
    (("report", "--help"), "simulations"),
])
def test_a_command_loads_its_own_side(argv: tuple[str, ...], side: str) -> None:
    code, out, loaded = _fedshift(*argv)
    assert code == 0 and out.startswith(f"usage: fedshift {argv[0]}")
    assert {s for s, modules in _sides(loaded).items() if modules} == {side}
