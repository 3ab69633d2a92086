"""``fedshift site check|run|unit CONFIG``: run a hospital site as a Flower SuperNode.

``check`` prints the verdicts of :func:`client.site_check.check_site`; ``run``
checks, then replaces itself with ``flower-supernode`` connected to the
SuperLink with TLS and SuperNode authentication, the site's settings passed as
node config; ``unit`` prints a hardened systemd service that runs ``run``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TextIO

from client.site_check import CheckResult, Verdict, check_site
from client.site_config import NodeConfig, SiteConfig, SiteConfigError, load_site_config

SUPERNODE = "flower-supernode"
RESTART_SEC = 30

UNIT_TEMPLATE = """\
# systemd service of fedshift site {name}. Install as
# /etc/systemd/system/fedshift-{name}.service, create the account and the ledger
# folder (owned by it), then `systemctl enable --now fedshift-{name}`.
[Unit]
Description=fedshift site {name} (Flower SuperNode for {address})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
# A dedicated account that can read the data, the certificates and the key, and
# write the ledger folder; replace the placeholder.
User=fedshift-site
Group=fedshift-site
WorkingDirectory={workdir}
# Flower installs each run's app under $HOME/.flwr: a private state folder.
StateDirectory=fedshift-{name}
Environment=HOME=%S/fedshift-{name}
ExecStart={exec_start}
Restart=on-failure
RestartSec={restart_sec}
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
# The ledger folder must exist; it is the only place outside the state folder
# the site writes.
ReadWritePaths={ledger_dir}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def add_site_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``site`` with its subcommands ``check``, ``run`` and ``unit``.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The subparsers of the ``fedshift`` parser.
    """
    p = sub.add_parser(
        "site", help="check, run or install a hospital site (a Flower SuperNode)",
        description="Run a hospital site from its TOML file (see client/site.example.toml).",
    )
    site_sub = p.add_subparsers(dest="site_command", required=True)
    commands = {
        "check": "check the site's config, data, budget, ledger, device and credentials",
        "run": "check, then start flower-supernode with the site's settings",
        "unit": "print a systemd service that runs the site",
    }
    for command, text in commands.items():
        c = site_sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument("config", type=Path, metavar="CONFIG", help="the site's TOML file")
        c.add_argument("--verbose", action="store_true", help="log what is loaded")
        if command == "run":
            c.add_argument("--dry-run", action="store_true",
                           help="print the flower-supernode command instead of running it")


def _toml_value(key: str, value: str | int | float | bool) -> str:
    """``value`` as a TOML value that Flower's ``--node-config`` parser reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise SiteConfigError(f"node config {key} = {value!r} holds a control character")
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise SiteConfigError(
        f"node config {key} = {value!r} holds both quote kinds (or a quote and a backslash), "
        "which flower-supernode's --node-config cannot carry; rename the path"
    )


def node_config_arg(node_config: NodeConfig) -> str:
    """The ``--node-config`` argument: space-separated ``key=value`` in TOML syntax."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in node_config.items())


def _executable(name: str) -> str | None:
    """``name`` beside the running Python (same environment) or else on PATH."""
    beside = Path(sys.executable).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def supernode_command(config: SiteConfig, executable: str = SUPERNODE) -> list[str]:
    """The ``flower-supernode`` command line for ``config`` (TLS and authentication on).

    Parameters
    ----------
    config : SiteConfig
        The site's settings.
    executable : str (default: "flower-supernode")
        The program to put first.
    """
    link = config.superlink
    trusted = ["--trusted-entities", str(link.trusted_entities)] if link.trusted_entities else []
    return [
        executable,
        "--superlink", link.address,
        "--root-certificates", str(link.ca_certificate),
        "--auth-supernode-private-key", str(link.private_key),
        "--node-config", node_config_arg(config.node_config()),
        "--isolation", "subprocess",
        "--port", str(link.clientapp_port),
        *trusted,
    ]


def _systemd_quote(arg: str) -> str:
    escaped = arg.replace("%", "%%")
    if escaped and not any(ch in escaped for ch in " \t\"'\\"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(config: SiteConfig) -> str:
    """A systemd service running ``fedshift site run`` on ``config``'s file."""
    fedshift = _executable("fedshift")
    program = [fedshift] if fedshift else [sys.executable, "-m", "simulations.cli"]
    exec_start = " ".join(_systemd_quote(a) for a in
                          [*program, "site", "run", str(config.source)])
    return UNIT_TEMPLATE.format(
        name=config.name, address=config.superlink.address, exec_start=exec_start,
        workdir=str(config.source.parent).replace("%", "%%"),
        ledger_dir=_systemd_quote(str(config.privacy.ledger.parent)), restart_sec=RESTART_SEC,
    )


def format_results(results: list[CheckResult]) -> str:
    """The verdicts as an aligned text table."""
    width = max(len(r.item) for r in results)
    return "\n".join(f"{r.verdict.value.upper():<7}  {r.item:<{width}}  {r.message}"
                     for r in results)


def _checked(config: SiteConfig, out: TextIO) -> bool:
    results = check_site(config)
    print(format_results(results), file=out)
    return not any(r.verdict is Verdict.FAIL for r in results)


def run_site_command(args: argparse.Namespace) -> int:
    """Carry out ``fedshift site check|run|unit``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by the parser :func:`add_site_parser` adds: ``site_command``,
        ``config`` and, for ``run``, ``dry_run``.

    Returns
    -------
    int
        0 on success; 1 when the config file is unusable, a check fails (``check``,
        ``run``) or flower-supernode cannot be found. ``run`` without
        ``--dry-run`` does not return: flower-supernode replaces this process.
    """
    try:
        config = load_site_config(args.config)
    except SiteConfigError as exc:
        print(f"FAIL     config  {exc}", file=sys.stderr)
        return 1
    if args.site_command == "check":
        return 0 if _checked(config, sys.stdout) else 1
    if args.site_command == "unit":
        print(systemd_unit(config), end="")
        return 0
    if args.dry_run:
        ok = _checked(config, sys.stderr)
        print(shlex.join(supernode_command(config)))
        return 0 if ok else 1
    if not _checked(config, sys.stderr):
        print("fedshift: error: the site fails its checks; not starting the SuperNode",
              file=sys.stderr)
        return 1
    executable = _executable(SUPERNODE)
    if executable is None:
        print(f"fedshift: error: {SUPERNODE} not found beside {sys.executable} or on PATH; "
              "install flwr in this environment", file=sys.stderr)
        return 1
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(executable, supernode_command(config, executable))
