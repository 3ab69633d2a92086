"""The site worker: ClientApps forward to it over an authenticated socket; it answers warm,
from its own site file, and charges the ledger exactly as without it."""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import site_worker
from client.app import make_client_app
from client.privacy_ledger import PrivacyLedger
from client.site_cli import run_supervised
from client.site_config import SiteConfig, load_site_config
from client.site_worker import handle, serve
from client.worker_link import (
    WORKER_KEY_FILE,
    WORKER_SOCKET,
    WorkerReply,
    WorkerRequest,
    ask_worker,
    read_worker_key,
)
from common.federation_config import FederationConfig
from common.messages import ERROR_BAD_REQUEST, ERROR_SITE_WORKER, MessageError, Refusal
from common.model_surgery import build_model
from common.trainable_arrays import trainable_arrays
from tests.site_files import write_site

pytestmark = pytest.mark.usefixtures("server_identity")


def _key_file(path: Path, key: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return path


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[SiteConfig, Path, Path]]:
    config = load_site_config(write_site(tmp_path / "site"))
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    key_file = _key_file(folder / "worker.key", secrets.token_bytes(32))
    socket_path = folder / "worker.sock"
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(config, socket_path, read_worker_key(key_file),
                                                  stop), daemon=True)
    thread.start()
    while not socket_path.exists():
        assert thread.is_alive()
        threading.Event().wait(0.05)
    yield config, socket_path, key_file
    stop.set()
    # One connection, refused for its wrong key, wakes the accept loop so it sees the stop.
    _forward(socket_path, _key_file(folder / "waker.key", b"w" * 32), "train", {}, {})
    thread.join(10)


def _run() -> FederationConfig:
    return FederationConfig(image_size=16, num_rounds=1, shift=False, batch_size=16)


def _forward(socket_path: Path, key_file: Path, message_type: str, config: dict,
             node_config: dict) -> Message:
    run = _run()
    arrays = trainable_arrays(build_model(run.model_spec()))
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                  dst_node_id=7, message_type=message_type)
    node = {**node_config, WORKER_SOCKET: str(socket_path), WORKER_KEY_FILE: str(key_file)}
    return make_client_app()(msg, Context(run_id=42, node_id=7, node_config=node,
                                          state=RecordDict(), run_config=run.to_flower()))


def test_a_forwarded_train_message_is_answered_from_the_site_file_and_charged_once(
        worker: tuple[SiteConfig, Path, Path]) -> None:
    config, socket_path, key_file = worker
    # The ClientApp's node config cannot raise the budget: the worker reads its own file.
    reply = _forward(socket_path, key_file, MessageType.TRAIN, {"server-round": 1},
                     {"epsilon": 100.0, "ledger-path": "/elsewhere.json"})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert isinstance(reply.content["arrays"], ArrayRecord)
    assert reply.content["site"]["name"] == config.name
    ledger = PrivacyLedger(config.privacy.ledger, 1.0, 1e-5)
    [charge] = [e for e in ledger.entries() if e.mechanism == "dp-sgd"]
    assert ledger.target_epsilon == 1.0 and ledger.epsilon_spent() <= 1.0
    before = config.privacy.ledger.read_text()
    again = _forward(socket_path, key_file, MessageType.TRAIN, {"server-round": 1}, {})
    assert not again.has_error()
    assert config.privacy.ledger.read_text() == before  # the same reply, nothing charged
    assert charge.round == 1


def test_a_client_with_the_wrong_key_is_refused_and_nothing_is_charged(
        worker: tuple[SiteConfig, Path, Path], tmp_path: Path) -> None:
    config, socket_path, _ = worker
    wrong = _key_file(tmp_path / "wrong.key", secrets.token_bytes(32))
    reply = _forward(socket_path, wrong, MessageType.TRAIN, {"server-round": 1}, {})
    assert reply.has_error() and reply.error.code == ERROR_SITE_WORKER
    assert "did not answer" in reply.error.reason
    assert not config.privacy.ledger.exists()


def test_an_unreachable_worker_gives_a_refusal_that_says_where_to_look(tmp_path: Path) -> None:
    key = _key_file(tmp_path / "k", secrets.token_bytes(32))
    reply = _forward(tmp_path / "none.sock", key, MessageType.EVALUATE, {"server-round": 1}, {})
    assert reply.has_error() and reply.error.code == ERROR_SITE_WORKER
    assert "fedshift site run" in reply.error.reason


def test_a_key_others_can_read_or_a_short_key_is_refused(tmp_path: Path) -> None:
    shared = _key_file(tmp_path / "shared.key", secrets.token_bytes(32))
    shared.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        read_worker_key(shared)
    with pytest.raises(PermissionError, match="32 or more"):
        read_worker_key(_key_file(tmp_path / "short.key", b"x" * 8))


def test_frames_round_trip_and_malformed_frames_are_refused() -> None:
    content = RecordDict({"config": ConfigRecord({"server-round": 3})})
    request = WorkerRequest("train", "42", 7, {"image-size": 16, "dp": True, "lr": 0.5},
                            content)
    back = WorkerRequest.from_bytes(request.to_bytes())
    assert (back.message_type, back.run_id, back.node_id, back.run_config) == (
        "train", "42", 7, {"image-size": 16, "dp": True, "lr": 0.5})
    assert back.content is not None and back.content["config"]["server-round"] == 3
    refusal = Refusal(4001, "over budget")
    assert WorkerReply.from_bytes(WorkerReply(refusal).to_bytes()).outcome == refusal
    data = request.to_bytes()
    for bad in (data[:2], b"\x00\x10\x00\x00{}", b"\x00\x00\x00\x02[]"):
        with pytest.raises(MessageError):
            WorkerRequest.from_bytes(bad)
    header = json.dumps({"message-type": "train", "run-id": "42", "node-id": True,
                         "run-config": {}, "content": False}).encode()
    with pytest.raises(MessageError, match="node-id"):
        WorkerRequest.from_bytes(struct.pack("!I", len(header)) + header)


def test_the_clientapp_module_imports_no_torch() -> None:
    """A deployed ClientApp process per message pays for what client.app imports."""
    out = subprocess.run([sys.executable, "-c", "import sys, client.app; "
                          "print(sorted(m for m in ('torch', 'timm', 'opacus') "
                          "if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_starts_the_worker_first_and_stops_it_when_the_supernode_stops(
        tmp_path: Path) -> None:
    config = load_site_config(write_site(tmp_path / "site"))
    seen = tmp_path / "supernode-argv"
    fake = tmp_path / "flower-supernode"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {seen}\nexit 3\n")
    fake.chmod(0o755)
    assert run_supervised(config, str(fake)) == 3
    argv = seen.read_text().splitlines()
    node_config = argv[argv.index("--node-config") + 1]
    socket_path = node_config.split('worker-socket="')[1].split('"')[0]
    assert socket_path.endswith("worker.sock")
    assert not Path(socket_path).parent.exists()  # the private folder and its key are gone


def test_the_worker_refuses_garbage_and_message_types_a_site_does_not_answer(
        tmp_path: Path) -> None:
    config = load_site_config(write_site(tmp_path / "site"))
    for data in (b"garbage", WorkerRequest("query.other", "42", 7, {}, None).to_bytes()):
        outcome = WorkerReply.from_bytes(handle(config, data)).outcome
        assert isinstance(outcome, Refusal) and outcome.code == ERROR_BAD_REQUEST
        assert outcome.reason.startswith(config.name)
    assert not config.privacy.ledger.exists()


def test_a_message_that_fails_inside_the_worker_is_refused_and_the_worker_lives_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_site_config(write_site(tmp_path / "site"))

    def broken(*args: object) -> RecordDict:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(site_worker, "answer", broken)
    outcome = WorkerReply.from_bytes(handle(config, WorkerRequest(
        "train", "42", 7, {}, None).to_bytes())).outcome
    assert isinstance(outcome, Refusal) and outcome.code == ERROR_SITE_WORKER
    assert "disk on fire" in outcome.reason and "see its log" in outcome.reason


def test_a_worker_socket_without_a_key_file_is_refused_with_the_way_out(tmp_path: Path) -> None:
    outcome = ask_worker({WORKER_SOCKET: str(tmp_path / "s")},
                         WorkerRequest("train", "42", 7, {}, None))
    assert isinstance(outcome, Refusal) and outcome.code == ERROR_SITE_WORKER
    assert WORKER_KEY_FILE in outcome.reason and "fedshift site run" in outcome.reason
