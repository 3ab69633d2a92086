"""The line between a short-lived ClientApp process and the site's long-lived worker.

A deployed SuperNode starts a new ``flwr-clientapp`` process for every message
(Flower 1.42 hands each app execution its own token), so nothing a ClientApp
builds outlives the message. ``fedshift site run`` therefore starts a site worker
(:mod:`client.site_worker`) that keeps the site's images, weights and accounting
warm, and the ClientApp forwards each message to it: one connection per message
over a Unix socket in a folder only the site's account can enter.

Both ends prove they hold the site's worker key (the HMAC challenge of
:mod:`multiprocessing.connection`, each way) before anything else is sent. The
connection carries bytes only, never pickles: a :class:`WorkerRequest` or a
:class:`WorkerReply`, each a JSON header and, where there is one, Flower's own
protobuf encoding of the message content.
"""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from common.messages import ERROR_SITE_WORKER, MessageError, Refusal

WORKER_SOCKET = "worker-socket"
WORKER_KEY_FILE = "worker-key-file"
MAX_FRAME_BYTES = 1 << 30
"""Largest request or reply a worker connection carries (the model's arrays fit)."""

_HEADER = struct.Struct("!I")
ConfigValue = bool | int | float | str


def _frame(header: dict[str, Any], content: RecordDict | None) -> bytes:
    head = json.dumps(header, allow_nan=False).encode()
    body = recorddict_to_proto(content).SerializeToString() if content is not None else b""
    return _HEADER.pack(len(head)) + head + body


def _unframe(data: bytes, what: str) -> tuple[dict[str, Any], RecordDict | None]:
    if len(data) < _HEADER.size:
        raise MessageError(f"{what}: {len(data)} bytes, too short for a header")
    (size,) = _HEADER.unpack_from(data)
    if size > len(data) - _HEADER.size:
        raise MessageError(f"{what}: the header claims {size} bytes, more than were sent")
    try:
        header = json.loads(data[_HEADER.size:_HEADER.size + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{what}: the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise MessageError(f"{what}: the header must be a JSON object")
    body = data[_HEADER.size + size:]
    if not header.get("content"):
        if body:
            raise MessageError(f"{what}: content sent but the header announces none")
        return header, None
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError, whose module path varies by version
        raise MessageError(f"{what}: the content is not a Flower RecordDict ({exc})") from exc
    return header, recorddict_from_proto(proto)


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MessageError(f"{what}: header field {key!r} is missing or of the wrong type")
    return value


@dataclass(frozen=True)
class WorkerRequest:
    """One message for the site, as the ClientApp received it."""

    message_type: str
    run_id: str
    node_id: int
    run_config: dict[str, ConfigValue]
    content: RecordDict | None

    def to_bytes(self) -> bytes:
        return _frame({"message-type": self.message_type, "run-id": self.run_id,
                       "node-id": self.node_id, "run-config": self.run_config,
                       "content": self.content is not None}, self.content)

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerRequest:
        what = "request to the site worker"
        header, content = _unframe(data, what)
        run_config = _field(header, "run-config", dict, what)
        if not all(isinstance(v, ConfigValue) for v in run_config.values()):
            raise MessageError(f"{what}: run config values must be booleans, numbers or text")
        return cls(message_type=_field(header, "message-type", str, what),
                   run_id=_field(header, "run-id", str, what),
                   node_id=_field(header, "node-id", int, what), run_config=run_config,
                   content=content)


@dataclass(frozen=True)
class WorkerReply:
    """The worker's answer: the reply's content, or a refusal."""

    outcome: RecordDict | Refusal

    def to_bytes(self) -> bytes:
        if isinstance(self.outcome, Refusal):
            return _frame({"code": self.outcome.code, "reason": self.outcome.reason,
                           "content": False}, None)
        return _frame({"content": True}, self.outcome)

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerReply:
        what = "reply of the site worker"
        header, content = _unframe(data, what)
        if content is not None:
            return cls(content)
        return cls(Refusal(_field(header, "code", int, what), _field(header, "reason", str, what)))


def read_worker_key(path: Path) -> bytes:
    """The worker key in ``path``; refused when others than its owner may read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by others (mode {stat.filemode(mode)}); "
                              "the site worker key must be private to the site's account")
    key = path.read_bytes()
    if len(key) < 32:
        raise PermissionError(f"{path} holds {len(key)} bytes; a worker key has 32 or more")
    return key


def ask_worker(node_config: Mapping[str, Any], request: WorkerRequest) -> RecordDict | Refusal:
    """Send ``request`` to the worker the node config names; its reply or a refusal.

    A worker that cannot be reached, fails authentication or answers nonsense
    gives a :class:`Refusal` with :data:`common.messages.ERROR_SITE_WORKER`: nothing
    was computed or charged on this side, and the reason says what to look at.
    """
    address = str(node_config[WORKER_SOCKET])
    if WORKER_KEY_FILE not in node_config:
        return Refusal(ERROR_SITE_WORKER, f"node config sets {WORKER_SOCKET} but not "
                       f"{WORKER_KEY_FILE}; start the site with `fedshift site run`")
    try:
        key = read_worker_key(Path(str(node_config[WORKER_KEY_FILE])))
        with Client(address, family="AF_UNIX", authkey=key) as conn:
            conn.send_bytes(request.to_bytes())
            data = conn.recv_bytes(MAX_FRAME_BYTES)
        return WorkerReply.from_bytes(data).outcome
    except (OSError, EOFError, AuthenticationError, MessageError) as exc:
        return Refusal(ERROR_SITE_WORKER,
                       f"the site worker at {address} did not answer ({type(exc).__name__}: "
                       f"{exc}); is `fedshift site run` still running its worker?")
