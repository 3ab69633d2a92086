"""What a site does with one message, whichever process it runs in.

:func:`answer` takes what a Flower message and its context hold (message type,
content, run id, node and run config) and returns the reply's content or a
:class:`Refusal`. The ClientApp calls it in its own process (simulation, or a
SuperNode without a site worker); a deployed site's worker
(:mod:`client.site_worker`) calls it in the long-lived process that keeps the
site's images, weights and accounting warm.

Every request is parsed by :class:`common.messages.Request` (unknown keys and
malformed values are refused) and every reply is one of the typed records of
:mod:`common.messages`, holding DP releases charged to the ledger and only the
non-DP values the site's policy names. A request the site already answered
(the same kind and round of the same run, as a resumed server sends) gets the
recorded reply: nothing is computed or charged again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from client.privacy_ledger import BudgetExceeded, LedgerError
from client.release_policy import SitePolicy
from client.shift_queries import answer_shift_query
from client.site_runtime import SiteLoader, SiteRuntime, resolve_site
from client.site_work import evaluate_site, train_site
from common.data.federation import load_federation
from common.data.splits import DataFileError
from common.federation_config import ConfigError, FederationConfig
from common.messages import (
    ARRAYS,
    ERROR_BAD_REQUEST,
    ERROR_BUDGET_EXCEEDED,
    ERROR_NOT_ALLOWED,
    ERROR_SITE_DATA,
    SHIFT_QUERY_TYPE,
    DeploymentReply,
    EvaluateReply,
    MessageError,
    MomentsReply,
    Refusal,
    Request,
    TrainReply,
    ValidationReply,
)
from common.trainable_arrays import ArrayMismatch

logger = logging.getLogger(__name__)

Reply = TrainReply | EvaluateReply | MomentsReply | ValidationReply | DeploymentReply
Handler = Callable[[SiteRuntime, ArrayRecord, Request], Reply]


class ReleaseNotAllowed(PermissionError):
    """The site's policy does not allow this release."""


def _shift(site: SiteRuntime, arrays: ArrayRecord, request: Request
           ) -> MomentsReply | ValidationReply | DeploymentReply:
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


HANDLERS: dict[str, Handler] = {"train": train_site, "evaluate": evaluate_site,
                                SHIFT_QUERY_TYPE: _shift}
"""The message types a site answers and what it does for each."""


def answer(message_type: str, content: RecordDict | None, run_id: str, node_id: int,
           node_config: Mapping[str, Any], run_config: Mapping[str, Any],
           config: FederationConfig | None = None, load_sites: SiteLoader | None = None,
           policy: SitePolicy | None = None) -> RecordDict | Refusal:
    """The reply to one message, or why the site refuses it.

    Parameters
    ----------
    message_type : str
        ``train``, ``evaluate`` or ``query.shift``.
    content : RecordDict or None
        The message's content.
    run_id : str
        Flower's run id (the run key when the request names none).
    node_id : int
        Flower's node id (names the site in refusals before its name is known).
    node_config, run_config : Mapping
        The node's and the run's config.
    config : FederationConfig or None (default: None)
        The run's settings; None: parsed from ``run_config``.
    load_sites : SiteLoader or None (default: None)
        The simulated sites' data for a config; None: :func:`load_federation`.
    policy : SitePolicy or None (default: None)
        The simulated sites' release policy; None: the node config's.
    """
    who = str(node_config.get("site-name", f"node {node_id}"))
    try:
        handler = HANDLERS.get(message_type)
        if handler is None:
            raise MessageError(f"message type {message_type!r} is not one a site answers "
                               f"({', '.join(HANDLERS)})")
        cfg = config or FederationConfig.from_flower(dict(run_config))
        request = Request.parse(message_type, content, run_id)
        site = resolve_site(cfg, dict(node_config), request.run_key,
                            load_sites or load_federation, policy)
        who = site.name
        kind = f"{message_type}-{request.kind}".rstrip("-")
        if site.archive is not None:
            sent = site.archive.load(kind, request.server_round)
            if sent is not None:
                logger.info("%s: %s round %d answered already; sending the same reply",
                            site.name, kind, request.server_round)
                return sent
        assert content is not None  # Request.parse refuses a message without content
        reply = handler(site, content.array_records[ARRAYS], request).to_content()
        if site.archive is not None:
            site.archive.save(kind, request.server_round, reply)
        return reply
    except BudgetExceeded as exc:
        return _refuse(message_type, ERROR_BUDGET_EXCEEDED, f"{who}: {exc}")
    except ReleaseNotAllowed as exc:
        return _refuse(message_type, ERROR_NOT_ALLOWED, f"{who}: {exc}")
    except (DataFileError, LedgerError) as exc:
        return _refuse(message_type, ERROR_SITE_DATA, f"{who}: {exc}")
    except (ConfigError, MessageError, ArrayMismatch, ValueError, KeyError) as exc:
        return _refuse(message_type, ERROR_BAD_REQUEST, f"{who}: {type(exc).__name__}: {exc}")


def _refuse(message_type: str, code: int, reason: str) -> Refusal:
    logger.warning("refusing %s: %s", message_type, reason)
    return Refusal(code, reason)
