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
Release settings and limits
    :class:`client.release_policy.SitePolicy` (``release-non-dp``,
    ``aggregation-weights``, ``max-evaluations``, ``composition``, ``max-rounds``, ...).

Every request is parsed by :class:`common.messages.Request` (unknown keys and
malformed values are refused) and every reply is one of the typed records of
:mod:`common.messages`, holding DP releases charged to the ledger and only the
non-DP values the site's policy names. A request the site already answered
(the same kind and round of the same run, as a resumed server sends) gets the
recorded reply: nothing is computed or charged again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from client.privacy_ledger import BudgetExceeded, LedgerError
from client.release_policy import SitePolicy
from client.shift_queries import answer_shift_query
from client.site_runtime import SiteLoader, SiteRuntime, resolve_site
from client.site_work import evaluate_site, train_site
from common.federated_data import load_federation
from common.federation_config import ConfigError, FederationConfig
from common.medmnist_files import DataFileError
from common.messages import (
    ARRAYS,
    DeploymentReply,
    EvaluateReply,
    MessageError,
    MomentsReply,
    Request,
    TrainReply,
)
from common.trainable_arrays import ArrayMismatch

logger = logging.getLogger(__name__)

ERROR_BUDGET_EXCEEDED = 4001
ERROR_BAD_REQUEST = 4002
ERROR_SITE_DATA = 4003
ERROR_NOT_ALLOWED = 4004

Reply = TrainReply | EvaluateReply | MomentsReply | DeploymentReply
Handler = Callable[[SiteRuntime, ArrayRecord, Request], Reply]


class ReleaseNotAllowed(PermissionError):
    """The site's policy does not allow this release."""


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    logger.warning("refusing %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _guarded(handler: Handler, config: FederationConfig | None, load_sites: SiteLoader,
             policy: SitePolicy | None) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        who = str(context.node_config.get("site-name", f"node {context.node_id}"))
        try:
            cfg = config or FederationConfig.from_flower(context.run_config)
            request = Request.parse(msg, str(context.run_id))
            site = resolve_site(cfg, dict(context.node_config), request.run_key, load_sites,
                                policy)
            who = site.name
            kind = f"{msg.metadata.message_type}-{request.kind}".rstrip("-")
            if site.archive is not None:
                sent = site.archive.load(kind, request.server_round)
                if sent is not None:
                    logger.info("%s: %s round %d answered already; sending the same reply",
                                site.name, kind, request.server_round)
                    return Message(sent, reply_to=msg)
            content = handler(site, msg.content.array_records[ARRAYS], request).to_content()
            if site.archive is not None:
                site.archive.save(kind, request.server_round, content)
            return Message(content, reply_to=msg)
        except BudgetExceeded as exc:
            return _error_reply(msg, ERROR_BUDGET_EXCEEDED, f"{who}: {exc}")
        except ReleaseNotAllowed as exc:
            return _error_reply(msg, ERROR_NOT_ALLOWED, f"{who}: {exc}")
        except (DataFileError, LedgerError) as exc:
            return _error_reply(msg, ERROR_SITE_DATA, f"{who}: {exc}")
        except (ConfigError, MessageError, ArrayMismatch, ValueError, KeyError) as exc:
            return _error_reply(msg, ERROR_BAD_REQUEST, f"{who}: {type(exc).__name__}: {exc}")

    return run


def _shift(site: SiteRuntime, arrays: ArrayRecord, request: Request
           ) -> MomentsReply | DeploymentReply:
    policy = site.policy
    refused = [key for key, allowed in (("shift_summaries", policy.shift_summaries),
                                        ("label_histograms", policy.label_histograms))
               if not allowed]
    if refused and (request.kind == "moments" or not policy.shift_summaries):
        raise ReleaseNotAllowed(
            f"site {site.name} does not release {' or '.join(refused)} ([releases] "
            f"{' = false, '.join(refused)} = false in its site file); moment summaries carry "
            "per-class counts, so they need both"
        )
    return answer_shift_query(site, arrays, request)


def make_client_app(config: FederationConfig | None = None,
                    load_sites: SiteLoader = load_federation,
                    policy: SitePolicy | None = None) -> ClientApp:
    """A ClientApp using ``config`` (or each run's Flower run config when None).

    ``load_sites`` gives the simulated sites' data for a config (simulations with
    scenario files pass their own); ``policy`` is the simulated sites' release
    policy (None: each node config's, with the defaults).
    """
    app = ClientApp()
    app.train()(_guarded(train_site, config, load_sites, policy))
    app.evaluate()(_guarded(evaluate_site, config, load_sites, policy))
    app.query("shift")(_guarded(_shift, config, load_sites, policy))
    return app


app = make_client_app()
