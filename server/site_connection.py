"""Waiting, for a bounded time, until enough sites are connected for a round."""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from common.federation_config import FederationConfig

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class SitesNotConnected(RuntimeError):
    """Fewer nodes than the run needs were connected when ``connect-timeout`` ran out."""


def not_enough_sites_message(connected: int, cfg: FederationConfig) -> str:
    """What happened and the two ways out: size the federation, or need fewer sites."""
    needed = cfg.required_sites
    fewer = (f'--run-config "min-sites={connected}"' if connected
             else "a smaller min-sites or num-sites")
    return (
        f"{connected} node(s) connected, but this run needs {needed} (num-sites = "
        f"{cfg.num_sites}, min-sites = {cfg.min_sites}); gave up after waiting "
        f"connect-timeout = {cfg.connect_timeout:g} s. Either size the federation to "
        f"{needed} nodes (a local simulation: flwr run . --federation-config "
        f'"num-supernodes={needed}", since a new local federation simulates 2; a deployment: '
        f"start more SuperNodes), or need fewer sites ({fewer}; num-sites = N needs N "
        "prevalences in a simulation). Raise connect-timeout if the nodes are still starting."
    )


def wait_for_sites(grid: Grid, cfg: FederationConfig) -> list[int]:
    """The connected node ids once ``cfg.required_sites`` are connected.

    Raises
    ------
    SitesNotConnected
        When fewer are connected after ``cfg.connect_timeout`` seconds; the message
        says how many there are, how many are needed and what to change.
    """
    deadline = time.monotonic() + cfg.connect_timeout
    reported = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= cfg.required_sites:
            return nodes
        now = time.monotonic()
        if now >= deadline:
            raise SitesNotConnected(not_enough_sites_message(len(nodes), cfg))
        if len(nodes) != reported:
            logger.info("waiting up to %.0f s for %d sites: %d connected",
                        deadline - now, cfg.required_sites, len(nodes))
            reported = len(nodes)
        time.sleep(min(POLL_SECONDS, deadline - now))
