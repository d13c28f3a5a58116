"""Placement: where the next worker goes.

The foundation's policy spreads workers over failure domains (locations), fills the cheapest
first, and avoids locations that were preempted more often. Policies are small classes behind
one interface, registered by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Protocol

from spotrain.providers.base import Offer


class PlacementPolicy(Protocol):
    def choose(self, offers: Sequence[Offer], live: Mapping[str, int], preemptions: Mapping[str, int]) -> Offer | None:
        """The offer for one more worker, given live workers and past preemptions per location."""
        ...


class SpreadCheapest:
    """Fewest live workers first (failure domains), then price, then fewest preemptions."""

    def choose(self, offers: Sequence[Offer], live: Mapping[str, int], preemptions: Mapping[str, int]) -> Offer | None:
        if not offers:
            return None
        return min(offers, key=lambda o: (live.get(o.location, 0), o.spot_usd_per_hour,
                                          preemptions.get(o.location, 0), o.location))


POLICIES: dict[str, type] = {"spread-cheapest": SpreadCheapest}


def get_policy(name: str) -> PlacementPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name]()


def count_by_location(locations: Sequence[str]) -> Counter:
    return Counter(locations)
