"""The policies users have today, behind spotrain's PlacementPolicy interface, so the simulator
compares them on the same traces with the same controller, clock and budget code.

- on-demand: the cheapest on-demand offer in the spec's first region; never preempted.
- uniform-progress: Can't Be Late (NSDI'24): one zone; spot while at or ahead of the uniform
  progress line, on-demand while behind it, back to spot when ahead again.
- eager-next-region: SkyPilot's default recovery: spot only, one zone at a time; after a
  preemption or a capacity failure the whole job moves on to the next zone in the user's order.
"""

from __future__ import annotations

from collections.abc import Sequence

from spotrain.market import Location
from spotrain.policies.base import RESTART_HOURS, PlacementContext, PlacementPolicy
from spotrain.providers.base import Offer


def _first(offers: Sequence[Offer], ctx: PlacementContext) -> str:
    return ctx.allowed[0] if ctx.allowed else min(o.location for o in offers)


class OnDemandOneRegion(PlacementPolicy, name="on-demand"):
    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        if not offers:  # every offer filtered out (the hourly cap, the budget): nothing to buy
            return None
        region = Location.parse(_first(offers, ctx)).region
        same = [o for o in offers if o.market == "on-demand" and Location.parse(o.location).region == region]
        return min(same, key=lambda o: (o.spot_usd_per_hour, o.location), default=None)


def _progress_gap(ctx: PlacementContext, started_at: float) -> float:
    """Samples ahead (+) or behind (-) the uniform progress line."""
    if ctx.deadline is None or ctx.target_samples is None or ctx.deadline <= started_at:
        return 0.0
    expected = ctx.target_samples * (ctx.now - started_at) / (ctx.deadline - started_at)
    return ctx.samples_done - expected


def _behind_uniform_line(ctx: PlacementContext, started_at: float) -> bool:
    return _progress_gap(ctx, started_at) < 0


class UniformProgress(PlacementPolicy, name="uniform-progress"):
    def __init__(self) -> None:
        self.started_at: float | None = None

    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        self.started_at = ctx.now if self.started_at is None else self.started_at
        if not offers:
            return None
        zone = _first(offers, ctx)
        market = "on-demand" if _behind_uniform_line(ctx, self.started_at) else "spot"
        if market == "spot" and ctx.cooling_down(zone):
            return None  # ahead of the line and no spot here: wait
        same = [o for o in offers if o.location == zone and o.market == market]
        return min(same, key=lambda o: o.spot_usd_per_hour, default=None)

    def retire(self, ctx: PlacementContext) -> list[str]:
        if self.started_at is None or ctx.target_samples is None or ctx.deadline is None:
            return []
        # switch back only when ahead by more than a restart's worth of the line's pace
        line_rate = ctx.target_samples / max(ctx.deadline - self.started_at, 1.0)
        if _progress_gap(ctx, self.started_at) < 2 * RESTART_HOURS * 3600.0 * line_rate:
            return []
        zone = ctx.allowed[0] if ctx.allowed else None
        if zone is None or ctx.cooling_down(zone):
            return []
        # ahead again and spot may be back: give up on-demand, take spot on the next tick
        return [m.request_id for m in ctx.fleet if m.market == "on-demand"]


class EagerNextRegion(PlacementPolicy, name="eager-next-region"):
    def __init__(self) -> None:
        self.index = 0
        self.seen_preemptions = 0
        self.zones: list[str] = []

    def _current(self, ctx: PlacementContext) -> str:
        total = sum(ctx.preemptions.values())
        if total > self.seen_preemptions:
            self.seen_preemptions = total
            self.index += 1
        for _ in range(len(self.zones)):
            if not ctx.cooling_down(self.zones[self.index % len(self.zones)]):
                break
            self.index += 1
        return self.zones[self.index % len(self.zones)]

    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        spot = {o.location for o in offers if o.market == "spot"}
        self.zones = [z for z in ctx.allowed if z in spot] or sorted(spot)
        if not self.zones:
            return None
        zone = self._current(ctx)
        if ctx.cooling_down(zone):
            return None
        same = [o for o in offers if o.location == zone and o.market == "spot"]
        return min(same, key=lambda o: o.spot_usd_per_hour, default=None)

    def retire(self, ctx: PlacementContext) -> list[str]:
        if not self.zones or not ctx.fleet:
            return []
        # one zone at a time: after a preemption the whole job restarts in the next zone
        current = self._current(ctx)
        return [m.request_id for m in ctx.fleet if m.location != current]
