"""A real federation on loopback for tests: one SuperLink and SuperNodes as processes.

Each process runs in its own session, so killing it kills what it started
(SuperExec, ServerApp and ClientApp processes); :meth:`LoopbackFederation.close`
kills everything still running. Logs go to files under the federation's root.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.dev_credentials import Credentials, make_credentials

CONNECTION = "fedshift-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 2.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class LoopbackFederation:
    """Credentials, a Flower configuration and the processes of one test federation."""

    root: Path
    sites: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.creds: Credentials = make_credentials(self.root / "creds", [*self.sites, "intruder"])
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.creds.ca_certificate}"\n'
        )
        self.env["FLWR_HOME"] = str(self.home)
        # The commands of this environment first (flower-superlink starts more by name).
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.pop("CI", None)
        self.database = self.root / "superlink.db"

    def _start(self, name: str, argv: list[str]) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.root, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_superlink(self) -> Process:
        link = self._start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.creds.ca_certificate),
            "--ssl-certfile", str(self.creds.server_certificate),
            "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth",
            "--database", str(self.database), "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])
        wait_for(lambda: self._port_open() or not link.alive(), 60, "the SuperLink's port")
        if not link.alive():
            raise RuntimeError(f"the SuperLink exited:\n{link.text()[-3000:]}")
        return link

    def _port_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.root, text=True,
                              capture_output=True, timeout=timeout)

    def register(self, site: str) -> None:
        done = self.flwr("supernode", "register", str(self.creds.site_keys[site][1]),
                         CONNECTION, "--name", site)
        if done.returncode != 0:
            raise RuntimeError(f"registering {site} failed:\n{done.stdout}\n{done.stderr}")

    def start_supernode(self, site: str, argv: list[str]) -> Process:
        """Start ``argv`` (a ``flower-supernode`` or ``fedshift site run`` command) for ``site``."""
        return self._start(site, argv)

    def supernode_argv(self, site: str, node_config: str, clientapp_port: int,
                       retries: list[str] | None = None) -> list[str]:
        return [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.creds.ca_certificate),
            "--auth-supernode-private-key", str(self.creds.site_keys[site][0]),
            "--node-config", node_config, "--port", str(clientapp_port), *(retries or []),
        ]

    def online_nodes(self) -> int:
        done = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if done.returncode != 0:
            return 0
        nodes = json.loads(done.stdout).get("nodes", [])
        return sum(n.get("status") == "online" for n in nodes)

    def run(self, app_dir: Path, run_config: str) -> str:
        """Submit a run with ``flwr run``; its run id."""
        done = self.flwr("run", str(app_dir), CONNECTION, "--run-config", run_config,
                         "--format", "json", timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{done.stdout}\n{done.stderr}")
        return str(json.loads(done.stdout)["run-id"])

    def run_status(self, run_id: str) -> str:
        done = self.flwr("ls", CONNECTION, "--format", "json")
        if done.returncode != 0:
            return ""
        runs = {r["run-id"]: r for r in json.loads(done.stdout).get("runs", [])}
        return str(runs.get(run_id, {}).get("status", ""))

    def kill(self, process: Process) -> None:
        if process.alive():
            os.killpg(process.popen.pid, signal.SIGKILL)
        process.popen.wait(timeout=30)

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.text()[-4000:]}" for p in self.processes)
