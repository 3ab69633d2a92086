"""``fedshift site check|run|unit CONFIG``: run a hospital site as a Flower SuperNode.

``check`` prints the verdicts of :func:`client.site_check.check_site`; ``run``
checks, then starts the site's worker (:mod:`client.site_worker`, which keeps
the site warm between messages) and ``flower-supernode`` connected to the
SuperLink with TLS and SuperNode authentication, the site's settings and the
worker's socket passed as node config, and supervises both: when one stops, it
stops the other and exits, so that systemd restarts the pair; ``unit`` prints a
hardened systemd service that runs ``run``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

from client.site_check import CheckResult, Verdict, check_site
from client.site_config import NodeConfig, SiteConfig, SiteConfigError, load_site_config
from client.worker_link import WORKER_KEY_FILE, WORKER_SOCKET

SUPERNODE = "flower-supernode"
RESTART_SEC = 30
WORKER_START_SECONDS = 300.0
"""How long ``run`` waits for the worker to listen before giving up."""
STOP_SECONDS = 10.0
"""How long a stopped process gets to exit before it is killed."""

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
        "site",
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


def supernode_command(config: SiteConfig, executable: str = SUPERNODE,
                      worker: tuple[Path, Path] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for ``config`` (TLS and authentication on).

    Parameters
    ----------
    config : SiteConfig
        The site's settings.
    executable : str (default: "flower-supernode")
        The program to put first.
    worker : (socket, key file) or None (default: None)
        The site worker the ClientApps forward to; None: they answer themselves.
    """
    node_config = dict(config.node_config())
    if worker is not None:
        node_config.update({WORKER_SOCKET: str(worker[0]), WORKER_KEY_FILE: str(worker[1])})
    link = config.superlink
    trusted = ["--trusted-entities", str(link.trusted_entities)] if link.trusted_entities else []
    return [
        executable,
        "--superlink", link.address,
        "--root-certificates", str(link.ca_certificate),
        "--auth-supernode-private-key", str(link.private_key),
        "--node-config", node_config_arg(node_config),
        "--isolation", "subprocess",
        "--port", str(link.clientapp_port),
        *trusted,
    ]


def worker_command(config: SiteConfig, socket_path: Path, key_file: Path) -> list[str]:
    """The command line of the site's worker process."""
    return [sys.executable, "-m", "client.site_worker", str(config.source),
            "--socket", str(socket_path), "--key-file", str(key_file)]


@contextmanager
def _private_folder() -> Iterator[Path]:
    """A fresh folder only this account can enter (removed afterwards), holding a new
    worker key; the worker's socket goes beside it."""
    with tempfile.TemporaryDirectory(prefix="fedshift-site-") as folder:
        path = Path(folder)
        os.chmod(path, 0o700)
        key = path / "worker.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        yield path


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def run_supervised(config: SiteConfig, executable: str) -> int:
    """Start the worker, then the SuperNode; stop both when either stops (or on
    SIGTERM/SIGINT). Returns the exit code of the one that stopped first."""
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _private_folder() as folder:
            socket_path, key_file = folder / "worker.sock", folder / "worker.key"
            worker = subprocess.Popen(worker_command(config, socket_path, key_file))
            deadline = time.monotonic() + WORKER_START_SECONDS
            while not socket_path.exists():
                if worker.poll() is not None or stopping or time.monotonic() > deadline:
                    code = _stop(worker)
                    if not stopping:
                        print(f"fedshift: error: the site worker did not start (exit code "
                              f"{code}); see its log above", file=sys.stderr)
                    return code or 1
                time.sleep(0.1)
            supernode = subprocess.Popen(supernode_command(config, executable,
                                                           (socket_path, key_file)))
            processes = {"worker": worker, "flower-supernode": supernode}
            while not stopping and all(p.poll() is None for p in processes.values()):
                time.sleep(0.5)
            first = next((name for name, p in processes.items() if p.poll() is not None),
                         None)
            codes = {name: _stop(p) for name, p in processes.items()}
            if first is not None:
                print(f"fedshift: {first} stopped (exit code {codes[first]}); stopped the "
                      "other too", file=sys.stderr)
                return codes[first] or 1
            return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _systemd_quote(arg: str) -> str:
    escaped = arg.replace("%", "%%")
    if escaped and not any(ch in escaped for ch in " \t\"'\\"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(config: SiteConfig) -> str:
    """A systemd service running ``fedshift site run`` on ``config``'s file."""
    fedshift = _executable("fedshift")
    program = [fedshift] if fedshift else [sys.executable, "-m", "fedshift_cli"]
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
        ``--dry-run`` returns when the worker or the SuperNode stops (see
        :func:`run_supervised`).
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
        folder = Path(tempfile.gettempdir()) / "fedshift-site-XXXXXXXX"
        worker = (folder / "worker.sock", folder / "worker.key")
        print(shlex.join(worker_command(config, *worker)))
        print(shlex.join(supernode_command(config, SUPERNODE, worker)))
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
    return run_supervised(config, executable)
