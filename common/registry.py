"""A registry of named things: backbones, aggregators, label-shift estimators, study methods.

Each registry is a :class:`Registry`, a ``dict`` from name to entry that adds
:meth:`Registry.register` (an entry goes in under its own ``name``) and
:meth:`Registry.lookup` (an unknown name raises the registry's own error, listing
the names there are), so that every registry reads and fails alike.
"""

from __future__ import annotations

from typing import Protocol, TypeVar


class Named(Protocol):
    """Anything with a ``name``."""

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(dict[str, T]):
    """Entries by name, with the error an unknown name raises.

    Parameters
    ----------
    kind : str
        What an entry is, for error messages (``"backbone"``, ``"aggregator"``, ...).
    error : type[Exception]
        The exception an unknown name raises.
    """

    def __init__(self, kind: str, error: type[Exception]) -> None:
        super().__init__()
        self.kind = kind
        self.error = error

    def register(self, entry: T) -> T:
        """Add ``entry`` under its name (a name registered twice is a mistake)."""
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is registered already")
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry called ``name``; the registry's error, listing the names, if none is."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {known}") from None
