"""The fedshift ClientApp: local DP fine-tuning, federated evaluation and shift queries.

Flower loads ``client.app:app``. Run settings come from the run config
(:class:`common.federation_config.FederationConfig`); a site's own settings come
from its node config and win over the run config where both exist:

``partition-id``
    Which simulated site this node is (set by Flower's simulation engine).
``site-name``, ``ledger-path``, ``epsilon``, ``delta``
    The site's name, its ledger file and its privacy budget.
``data-path``, ``data-format``, ``channels``, ``clip``
    A deployed site's own data and settings (``fedshift site run`` passes them
    from the site's TOML file; see :mod:`client.site_config`).
``device``
    ``cuda``, ``cpu`` or ``auto`` (default: CUDA when available).
``worker-socket``, ``worker-key-file``
    Set by ``fedshift site run``: the site's worker process
    (:mod:`client.site_worker`) answers the message, and this process only
    forwards it (:mod:`client.worker_link`).
Release settings and limits
    :class:`client.release_policy.SitePolicy` (``release-non-dp``,
    ``aggregation-weights``, ``max-evaluations``, ``composition``, ``max-rounds``, ...).

What a site does with a message is :func:`client.message_handlers.answer`. A
deployed SuperNode starts a new ClientApp process for every message, so with a
worker this module imports nothing heavy: the worker holds torch, the model and
the images, warm from one message to the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.worker_link import WORKER_SOCKET, WorkerRequest, ask_worker
from common.messages import SHIFT_QUERY_TYPE, Refusal

if TYPE_CHECKING:
    from client.release_policy import SitePolicy
    from common.data.splits import SiteData
    from common.federation_config import FederationConfig

logger = logging.getLogger(__name__)


def _handle(config: FederationConfig | None,
            load_sites: Callable[[FederationConfig], Sequence[SiteData]] | None,
            policy: SitePolicy | None) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        node_config = dict(context.node_config)
        request = WorkerRequest(
            message_type=msg.metadata.message_type, run_id=str(context.run_id),
            node_id=int(context.node_id), run_config=dict(context.run_config),
            content=msg.content if msg.has_content() else None,
        )
        if WORKER_SOCKET in node_config:
            outcome = ask_worker(node_config, request)
        else:
            # Imported here: torch, the model and the data load only where the
            # message is answered in this process.
            from client.message_handlers import answer

            outcome = answer(request.message_type, request.content, request.run_id,
                             request.node_id, node_config, request.run_config, config,
                             load_sites, policy)
        if isinstance(outcome, Refusal):
            return Message(Error(code=outcome.code, reason=outcome.reason), reply_to=msg)
        return Message(outcome, reply_to=msg)

    return run


def make_client_app(config: FederationConfig | None = None,
                    load_sites: Callable[[FederationConfig], Sequence[SiteData]] | None = None,
                    policy: SitePolicy | None = None) -> ClientApp:
    """A ClientApp using ``config`` (or each run's Flower run config when None).

    ``load_sites`` gives the simulated sites' data for a config (simulations with
    scenario files pass their own; None: :func:`common.data.federation.load_federation`);
    ``policy`` is the simulated sites' release policy (None: each node config's,
    with the defaults).
    """
    app = ClientApp()
    handle = _handle(config, load_sites, policy)
    app.train()(handle)
    app.evaluate()(handle)
    app.query(SHIFT_QUERY_TYPE.removeprefix("query."))(handle)
    return app


app = make_client_app()
