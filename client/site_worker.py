"""A deployed site's worker: one long-lived process that answers the site's messages warm.

``fedshift site run`` starts it beside the SuperNode. It reads the site's TOML
file itself (its node config is the site file's, whatever a ClientApp sends),
listens on a Unix socket in a private folder and answers each message a
ClientApp forwards (:mod:`client.worker_link`) with
:func:`client.message_handlers.answer`. Between messages it keeps what is
expensive to rebuild and holds nothing private on disk: the decoded and resized
images, the pretrained weights and the accountant's curves stay in memory
(bounded caches), and each message rebuilds its model from them in a fraction of
a second. The privacy ledger stays the single source of truth: every message is
checked and charged against the ledger file, as without a worker.

    python -m client.site_worker SITE.toml --socket PATH --key-file PATH
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Connection, Listener
from pathlib import Path

from flwr.app import RecordDict

from client.message_handlers import answer
from client.site_config import SiteConfig, SiteConfigError, load_site_config
from client.worker_link import MAX_FRAME_BYTES, WorkerReply, WorkerRequest, read_worker_key
from common.messages import ERROR_BAD_REQUEST, ERROR_SITE_WORKER, MessageError, Refusal

logger = logging.getLogger(__name__)


def handle(config: SiteConfig, data: bytes) -> bytes:
    """The reply to one forwarded request, as bytes."""
    try:
        request = WorkerRequest.from_bytes(data)
    except MessageError as exc:
        return WorkerReply(Refusal(ERROR_BAD_REQUEST, f"{config.name}: {exc}")).to_bytes()
    start = time.perf_counter()
    try:
        outcome: RecordDict | Refusal = answer(
            request.message_type, request.content, request.run_id, request.node_id,
            dict(config.node_config()), request.run_config)
    except Exception as exc:  # the worker outlives a failed message, as Flower's SuperNode does
        logger.exception("%s: %s message failed", config.name, request.message_type)
        outcome = Refusal(ERROR_SITE_WORKER, f"{config.name}: the site worker failed on this "
                          f"message ({type(exc).__name__}: {exc}); see its log")
    logger.info("%s: %s message of run %s %s in %.2f s", config.name, request.message_type,
                request.run_id, "refused" if isinstance(outcome, Refusal) else "answered",
                time.perf_counter() - start)
    return WorkerReply(outcome).to_bytes()


def _serve_one(config: SiteConfig, conn: Connection) -> None:
    with conn:
        try:
            data = conn.recv_bytes(MAX_FRAME_BYTES)
        except (OSError, EOFError) as exc:
            logger.warning("%s: a ClientApp connected but sent no request (%s)", config.name, exc)
            return
        reply = handle(config, data)
        try:
            conn.send_bytes(reply)
        except OSError as exc:
            logger.warning("%s: the ClientApp left before the reply was sent (%s)",
                           config.name, exc)


def serve(config: SiteConfig, socket_path: Path, key: bytes,
          stop: threading.Event | None = None) -> None:
    """Answer forwarded messages on ``socket_path`` until ``stop`` is set (or forever).

    Connections that fail authentication are dropped and logged; requests are
    answered one at a time, in the order they arrive.
    """
    with Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        logger.info("%s: site worker listening on %s", config.name, socket_path)
        while stop is None or not stop.is_set():
            try:
                conn = listener.accept()
            except AuthenticationError as exc:
                logger.warning("%s: refused a connection that failed authentication (%s)",
                               config.name, exc)
                continue
            _serve_one(config, conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the site's TOML file")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    parser.add_argument("--key-file", type=Path, required=True,
                        help="file holding the worker key (private to the site's account)")
    args = parser.parse_args(argv)
    # force: an import on the way (Ray's, through Flower) has configured the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    try:
        config = load_site_config(args.config)
        key = read_worker_key(args.key_file)
    except (SiteConfigError, OSError) as exc:
        print(f"fedshift site worker: error: {exc}", file=sys.stderr)
        return 1
    serve(config, args.socket, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
