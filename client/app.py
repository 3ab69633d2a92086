"""The fedshift ClientApp: local DP fine-tuning and federated evaluation at a site.

Flower loads ``client.app:app``. Run settings come from the run config
(:class:`common.federation_config.FederationConfig`); a site's own settings come
from its node config and win over the run config where both exist:

``partition-id``
    Which simulated site this node is (set by Flower's simulation engine).
``site-name``, ``ledger-path``, ``epsilon``, ``delta``
    The site's name, its ledger file and its privacy budget.
``allow-metrics`` (default true)
    Whether evaluation metrics on the site's private test data may be released
    (a non-DP release, recorded in the ledger).
``allow-shift-summaries``, ``allow-label-histograms`` (default true)
    Whether the site answers shift queries (DP feature moments and score
    histograms, which carry per-class counts).
``data-path``, ``data-format``, ``channels``, ``clip``
    A deployed site's own data and settings (``fedshift site run`` passes them
    from the site's TOML file; see :mod:`client.site_config`).
``device``
    ``cuda``, ``cpu`` or ``auto`` (default: CUDA when available).

Besides ``train`` and ``evaluate`` it answers ``query.shift`` messages with DP
shift summaries (:mod:`client.shift_queries`). Train and evaluate replies carry
``skipped-images``: how many of the site's image files could not be read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.privacy_ledger import BudgetExceeded, LedgerError
from client.shift_queries import answer_shift_query
from client.site_runtime import SiteLoader, SiteRuntime, resolve_site
from client.site_work import evaluate_site, train_site
from common.federated_data import load_federation
from common.federation_config import ConfigError, FederationConfig
from common.medmnist_files import DataFileError
from common.trainable_arrays import ArrayMismatch

logger = logging.getLogger(__name__)

ERROR_BUDGET_EXCEEDED = 4001
ERROR_BAD_REQUEST = 4002
ERROR_SITE_DATA = 4003
ERROR_NOT_ALLOWED = 4004


class ReleaseNotAllowed(PermissionError):
    """The site's configuration does not allow this release."""


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    logger.warning("refusing %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _run_key(msg: Message, context: Context) -> str:
    """The run the ledger charges: the server's ``run-key`` (kept across a server
    restart), else Flower's run id."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    key = config.get("run-key") if config is not None else None
    return str(key) if key else str(context.run_id)


def _guarded(handler: Callable[[Message, SiteRuntime], RecordDict],
             config: FederationConfig | None, load_sites: SiteLoader
             ) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        who = str(context.node_config.get("site-name", f"node {context.node_id}"))
        try:
            cfg = config or FederationConfig.from_flower(context.run_config)
            site = resolve_site(cfg, dict(context.node_config), _run_key(msg, context),
                                load_sites)
            who = site.name
            return Message(handler(msg, site), reply_to=msg)
        except BudgetExceeded as exc:
            return _error_reply(msg, ERROR_BUDGET_EXCEEDED, f"{who}: {exc}")
        except ReleaseNotAllowed as exc:
            return _error_reply(msg, ERROR_NOT_ALLOWED, f"{who}: {exc}")
        except (DataFileError, LedgerError) as exc:
            return _error_reply(msg, ERROR_SITE_DATA, f"{who}: {exc}")
        except (ConfigError, ArrayMismatch, ValueError, KeyError) as exc:
            return _error_reply(msg, ERROR_BAD_REQUEST, f"{who}: {type(exc).__name__}: {exc}")

    return run


def _with_skipped(metrics: dict[str, float | int], site: SiteRuntime) -> MetricRecord:
    """The reply's metrics, with how many of the site's image files were unreadable."""
    return MetricRecord({**metrics, "skipped-images": site.skipped_images})


def _train(msg: Message, site: SiteRuntime) -> RecordDict:
    arrays, metrics = train_site(site, msg.content["arrays"], msg.content["config"])
    return RecordDict({"arrays": arrays, "metrics": _with_skipped(metrics, site),
                       "site": ConfigRecord({"name": site.name})})


def _evaluate(msg: Message, site: SiteRuntime) -> RecordDict:
    if not site.allow_metrics:
        raise ReleaseNotAllowed(
            f"site {site.name} does not release evaluation metrics (allow-metrics = false)"
        )
    metrics = evaluate_site(site, msg.content["arrays"], msg.content["config"])
    return RecordDict({"metrics": _with_skipped(metrics, site),
                       "site": ConfigRecord({"name": site.name})})


def _shift(msg: Message, site: SiteRuntime) -> RecordDict:
    refused = [key for key, allowed in (("shift-summaries", site.allow_shift_summaries),
                                        ("label-histograms", site.allow_label_histograms))
               if not allowed]
    if refused:
        raise ReleaseNotAllowed(
            f"site {site.name} does not release {' or '.join(refused)} (allow-"
            f"{' = false, allow-'.join(refused)} = false); shift summaries carry per-class "
            "counts, so they need both"
        )
    arrays, metrics = answer_shift_query(site, msg.content["arrays"], msg.content["config"])
    return RecordDict({
        "summaries": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"name": site.name}),
    })


def make_client_app(config: FederationConfig | None = None,
                    load_sites: SiteLoader = load_federation) -> ClientApp:
    """A ClientApp using ``config`` (or each run's Flower run config when None).

    ``load_sites`` gives the simulated sites' data for a config (simulations with
    scenario files pass their own).
    """
    app = ClientApp()
    app.train()(_guarded(_train, config, load_sites))
    app.evaluate()(_guarded(_evaluate, config, load_sites))
    app.query("shift")(_guarded(_shift, config, load_sites))
    return app


app = make_client_app()
