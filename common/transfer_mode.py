"""Transfer modes: which parts of the pretrained model a site fine-tunes."""

from __future__ import annotations

from dataclasses import dataclass

MODES_HELP = "bn+head (default), head, bn, partial:K (K >= 1), full, full-gn"


@dataclass(frozen=True)
class TransferMode:
    """A parsed transfer mode.

    Attributes
    ----------
    kind : str
        ``bn+head`` (BatchNorm scale/shift, input adapter and head), ``head``
        (linear probe), ``bn`` (scale/shift and adapter; the head stays at its
        seeded initialisation), ``partial`` (``bn+head`` plus every parameter of
        the last ``stages`` stages), ``full`` (everything, BatchNorm kept; non-private
        only) or ``full-gn`` (everything, after Opacus's usual recipe for DP: every
        BatchNorm replaced by a freshly initialised GroupNorm).
    stages : int
        Number of trailing stages trained in full (``partial`` only; else 0).
    """

    kind: str
    stages: int = 0

    @classmethod
    def parse(cls, text: str) -> TransferMode:
        """Parse ``bn+head``, ``head``, ``bn``, ``partial:K``, ``full`` or ``full-gn``."""
        value = text.strip().lower()
        if value in ("bn+head", "head", "bn", "full", "full-gn"):
            return cls(value)
        if value.startswith("partial:"):
            count = value.split(":", 1)[1]
            if count.isdigit() and int(count) >= 1:
                return cls("partial", int(count))
            raise ValueError(f"transfer mode {text!r}: K in partial:K must be an integer >= 1")
        raise ValueError(f"unknown transfer mode {text!r}; choose one of: {MODES_HELP}")

    @property
    def trains_head(self) -> bool:
        return self.kind in ("bn+head", "head", "partial", "full", "full-gn")

    @property
    def trains_affine(self) -> bool:
        return self.kind in ("bn+head", "bn", "partial", "full", "full-gn")

    @property
    def trains_everything(self) -> bool:
        return self.kind in ("full", "full-gn")

    @property
    def keeps_frozen_norms(self) -> bool:
        """Whether the pretrained BatchNorm statistics stay (as frozen normalisation)."""
        return not self.trains_everything

    @property
    def allows_dp(self) -> bool:
        """``full`` keeps BatchNorm, which DP-SGD cannot train; it is a non-private reference."""
        return self.kind != "full"

    def __str__(self) -> str:
        return f"partial:{self.stages}" if self.kind == "partial" else self.kind
