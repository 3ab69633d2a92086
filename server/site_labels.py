"""Which label the server's records give each node: its site name, unless another node holds it.

A site names itself in every reply, and nothing stops a node from claiming the
name of another. The server therefore keys what it records by node identity
(the node a request was sent to, which the SuperLink knows) and uses the claimed
name only as a label: the first node to claim a name keeps it for the run, and a
second node claiming a name that another node holds is recorded as
``"<name>@node-<node id>"``. Site names cannot contain ``@`` (see
:data:`common.messages.SITE_NAME_PATTERN`), so such a label never collides with a
name a site may claim. A name of the form ``node-<id>`` (the label of a node
that never named itself) is held by node ``<id>``, whoever claims it first.

A node keeps the label it got first even if it later claims another name. The
map is part of the server's checkpoint, so labels stay the same across a server
restart; a site whose SuperNode comes back under a new node id is therefore
recorded as ``"<name>@node-<new id>"``, since the server cannot tell it from a
node impersonating it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from flwr.app import Message

from common.messages import SITE, SITE_NAME_PATTERN

logger = logging.getLogger(__name__)

_NODE_LABEL = re.compile(r"node-(\d+)")


def addressed_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The node a reply is about: the request's destination when ``sent_to`` (message id
    to destination) knows it, since the SuperLink itself writes the error for a node
    that stopped answering; else the reply's sender."""
    message_id = reply.metadata.reply_to_message_id
    if message_id and message_id in sent_to:
        return sent_to[message_id]
    return reply.metadata.src_node_id


def destinations(messages: list[Message]) -> dict[str, int]:
    """Message id to destination node of sent ``messages`` (those with an id)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages
            if m.metadata.message_id}


def claimed_name(msg: Message) -> str | None:
    """The site name a reply claims, when it carries a well-formed one; else None."""
    if msg.has_error() or not msg.has_content():
        return None
    site = msg.content.config_records.get(SITE)
    name = site.get("name") if site is not None else None
    return name if isinstance(name, str) and SITE_NAME_PATTERN.fullmatch(name) else None


class SiteLabels:
    """The node id -> label map every server-side record uses (see the module docstring)."""

    def __init__(self, labels: Mapping[int, str] | None = None) -> None:
        self._labels: dict[int, str] = dict(labels or {})

    def __repr__(self) -> str:
        return f"SiteLabels({self._labels!r})"

    def known(self, node_id: int) -> str:
        """The node's label, or ``node-<id>`` for a node that has not named itself yet."""
        return self._labels.get(node_id, f"node-{node_id}")

    def _holder(self, name: str) -> int | None:
        for node, label in self._labels.items():
            if label == name:
                return node
        match = _NODE_LABEL.fullmatch(name)
        return int(match.group(1)) if match else None

    def label(self, node_id: int, name: str | None) -> str:
        """The label of ``node_id``, which claims the site name ``name`` (None: no name).

        The first claim of a node fixes its label; later claims leave it as is.
        """
        if node_id in self._labels:
            held = self._labels[node_id]
            if name is not None and name != held and not held.startswith(f"{name}@"):
                logger.warning("node %d, recorded as %s, now calls itself %s; keeping %s",
                               node_id, held, name, held)
            return held
        if name is None:
            return self.known(node_id)
        holder = self._holder(name)
        label = name
        if holder is not None and holder != node_id:
            label = f"{name}@node-{node_id}"
            logger.warning("node %d calls itself %s, which node %d holds; recording it as %s",
                           node_id, name, holder, label)
        self._labels[node_id] = label
        return label

    def reply_label(self, msg: Message, node_id: int) -> str:
        """The label of ``node_id`` for ``msg``, a reply about it."""
        return self.label(node_id, claimed_name(msg))

    def as_dict(self) -> dict[str, str]:
        """The map as JSON-safe values (node ids as strings), for a checkpoint."""
        return {str(node): label for node, label in self._labels.items()}

    def restore(self, state: Mapping[str, str]) -> None:
        """Take back the map :meth:`as_dict` gave (merged into this one)."""
        self._labels.update({int(node): str(label) for node, label in state.items()})
