"""The one registry shape behind backbones, aggregators, estimators and study methods."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from common.backbones import BACKBONES
from common.registry import Registry
from common.shift_estimators import ESTIMATORS
from server.aggregators import AGGREGATORS
from simulations.methods import METHODS


class ThingError(LookupError):
    """The error of the test registry."""


@dataclass(frozen=True)
class Thing:
    name: str


def test_entries_go_in_under_their_name_and_come_back_by_it() -> None:
    things: Registry[Thing] = Registry("thing", ThingError)
    first = things.register(Thing("b"))
    things.register(Thing("a"))
    assert things.lookup("b") is first and list(things) == ["b", "a"]


def test_an_unknown_name_raises_the_registrys_error_listing_the_names() -> None:
    things: Registry[Thing] = Registry("thing", ThingError)
    things.register(Thing("b"))
    things.register(Thing("a"))
    with pytest.raises(ThingError, match=r"^unknown thing 'c'; choose one of: a, b$"):
        things.lookup("c")


def test_a_name_registered_twice_is_refused() -> None:
    things: Registry[Thing] = Registry("thing", ThingError)
    things.register(Thing("a"))
    with pytest.raises(ValueError, match="thing 'a' is registered already"):
        things.register(Thing("a"))


@pytest.mark.parametrize("registry", [BACKBONES, AGGREGATORS, ESTIMATORS, METHODS])
def test_every_product_registry_is_one_and_keys_entries_by_name(registry: Registry) -> None:
    assert isinstance(registry, Registry) and len(registry) > 0
    assert all(entry.name == name for name, entry in registry.items())
