"""`spread-cheapest`: the simple spread used for the local provider."""

from __future__ import annotations

from collections.abc import Sequence

from spotrain.policies.base import PlacementContext, PlacementPolicy
from spotrain.providers.base import Offer


class SpreadCheapest(PlacementPolicy, name="spread-cheapest"):
    """Spot only: fewest live workers first (failure domains), then price, then fewest preemptions."""

    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        live: dict[str, int] = {}
        for member in ctx.fleet:
            live[member.location] = live.get(member.location, 0) + 1
        usable = [o for o in offers if o.market == "spot" and not ctx.cooling_down(o.location)]
        if not usable:
            return None
        return min(usable, key=lambda o: (live.get(o.location, 0), o.spot_usd_per_hour,
                                          ctx.preemptions.get(o.location, 0), o.location))
