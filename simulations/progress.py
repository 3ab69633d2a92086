"""The command line's progress bar over a run: round, phase, sites answered, elapsed time.

:class:`RunProgress` is a tqdm bar over the run's rounds. The server reports each
phase of a round as it starts and ends (:class:`server.phase_progress.PhaseProgress`),
which the bar's description shows ("round 3/5 · train · waiting for 4 sites", then
"4/4 sites answered in 57 s"); each finished round advances the bar and shows
the federation's DP balanced accuracy and refusals. The bar is redrawn every
second, so its elapsed time runs on while a phase waits for the sites.
"""

from __future__ import annotations

import threading
from typing import Any, TextIO

from tqdm import tqdm

from server.phase_progress import PhaseProgress

BAR_FORMAT = "{desc} | {n_fmt}/{total_fmt} rounds done | {elapsed} elapsed{postfix}"


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def phase_text(progress: PhaseProgress) -> str:
    """What the server is doing: round, phase, and the sites it waits for or heard from."""
    of = f"/{progress.num_rounds}" if progress.num_rounds else ""
    sites = "site" if progress.asked == 1 else "sites"
    if progress.answered is None:
        state = f"waiting for {progress.asked} {sites}"
    else:
        state = f"{progress.answered}/{progress.asked} {sites} answered"
        if progress.seconds is not None:
            state += f" in {_seconds(progress.seconds)}"
    return f"round {progress.server_round}{of} · {progress.phase} · {state}"


def round_text(entry: dict[str, Any]) -> str:
    """A finished round's outcome: DP balanced accuracy (if it evaluated), refusals."""
    parts = []
    accuracy = (entry.get("evaluate") or {}).get("balanced_accuracy")
    if isinstance(accuracy, float):
        parts.append(f"DP balanced accuracy {accuracy:.3f}")
    refused = len(entry.get("refused") or {}) + len(entry.get("rejected") or {})
    if refused:
        parts.append(f"{refused} refused or dropped")
    missing = sum(len(who) for who in (entry.get("missing") or {}).values())
    if missing:
        parts.append(f"{missing} without reply")
    return ", ".join(parts)


class RunProgress:
    """A progress bar over ``num_rounds`` rounds, fed by the server's callbacks.

    Parameters
    ----------
    num_rounds : int
        The run's rounds.
    file : TextIO or None (default: None)
        Where the bar is drawn (None: tqdm's default, stderr).
    redraw_seconds : float (default: 1.0)
        How often the bar is redrawn while nothing happens, so that its elapsed
        time runs on; 0: only when an event comes.
    """

    def __init__(self, num_rounds: int, file: TextIO | None = None,
                 redraw_seconds: float = 1.0) -> None:
        self.bar = tqdm(total=num_rounds, bar_format=BAR_FORMAT, file=file)
        self.bar.set_description_str(f"round 1/{num_rounds} · starting")
        self._stop = threading.Event()
        self._redraw: threading.Thread | None = None
        if redraw_seconds > 0:
            self._redraw = threading.Thread(target=self._redraw_every, args=(redraw_seconds,),
                                            name="progress-redraw", daemon=True)
            self._redraw.start()

    def _redraw_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.bar.refresh()

    def on_phase(self, progress: PhaseProgress) -> None:
        """Show the phase that starts or ends (a :data:`server.phase_progress.PhaseCallback`)."""
        self.bar.set_description_str(phase_text(progress))

    def on_round(self, entry: dict[str, Any]) -> None:
        """Advance by the round that ended (a :data:`server.strategy.RoundCallback`)."""
        self.bar.set_postfix_str(round_text(entry), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Stop redrawing and close the bar."""
        self._stop.set()
        if self._redraw is not None:
            self._redraw.join()
        self.bar.close()
