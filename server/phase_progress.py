"""What the server is waiting for now: an event when each phase of a round starts and ends.

A round has phases: ``train`` and, in the rounds that evaluate, ``evaluate``
(:mod:`server.app`); with shift estimation a ``shift query`` (the moment
summaries) follows every round, and the last one ends with a ``calibration
query`` (validation histograms, for the federation's calibration) and a
``deployment query`` (:mod:`server.shift_monitor`). Each phase sends messages to the sites and waits
for their replies; :class:`PhaseReporter` does that exchange and hands a
:class:`PhaseProgress` to a callback before it (``answered`` None) and after it,
so that a progress display can say which phase runs and how many sites have
answered. Without a callback it only exchanges the messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

PHASES = ("train", "evaluate", "shift query", "calibration query", "deployment query")


@dataclass(frozen=True)
class PhaseProgress:
    """One phase of one round, as it starts (``answered`` None) or ends.

    Attributes
    ----------
    server_round : int
        The round the phase belongs to.
    num_rounds : int
        The rounds the run has in all (0: not known).
    phase : str
        One of :data:`PHASES`.
    asked : int
        Sites sent work in this phase.
    answered : int or None
        Sites that replied (a refusal included) by the end of the phase; None
        while it runs.
    seconds : float or None
        How long the server waited for the replies; None while the phase runs.
    """

    server_round: int
    num_rounds: int
    phase: str
    asked: int
    answered: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")

    @property
    def finished(self) -> bool:
        return self.answered is not None


PhaseCallback = Callable[[PhaseProgress], None]


def answered_sites(sent: Sequence[Message], replies: Sequence[Message]) -> int:
    """How many of the nodes ``sent`` were addressed to sent at least one of ``replies``."""
    asked = {m.metadata.dst_node_id for m in sent}
    return len(asked & {m.metadata.src_node_id for m in replies})


class PhaseReporter:
    """Exchanges a phase's messages with the sites and reports the phase to ``on_phase``.

    Parameters
    ----------
    num_rounds : int
        The run's rounds (0: not known), passed on in every event.
    on_phase : callable or None (default: None)
        Called with a :class:`PhaseProgress` as each phase starts and as it ends.
    """

    def __init__(self, num_rounds: int, on_phase: PhaseCallback | None = None) -> None:
        self.num_rounds = num_rounds
        self.on_phase = on_phase

    def exchange(self, grid: Grid, messages: Sequence[Message], timeout: float | None,
                 server_round: int, phase: str) -> tuple[list[Message], float]:
        """Send ``messages`` and wait for the replies (``grid.send_and_receive``);
        return the replies and the seconds waited."""
        sent = list(messages)
        asked = len({m.metadata.dst_node_id for m in sent})
        self._report(PhaseProgress(server_round, self.num_rounds, phase, asked))
        start = time.perf_counter()
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        seconds = time.perf_counter() - start
        self._report(PhaseProgress(server_round, self.num_rounds, phase, asked,
                                   answered_sites(sent, replies), seconds))
        return replies, seconds

    def _report(self, progress: PhaseProgress) -> None:
        if self.on_phase is not None:
            self.on_phase(progress)
