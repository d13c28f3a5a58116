"""Placement policies: which offer the next worker gets, and which workers to retire.

Every policy sees the same PlacementContext (the fleet, preemptions and capacity failures per
location, progress against the deadline) and is registered by name. `spotrain`, the default
for clouds, minimizes the expected cost per sample of the whole placement, egress included;
`spread-cheapest` is the simple spread used for the local provider.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from spotrain.market import Location
from spotrain.providers.base import Offer
from spotrain.throughput import TaskProfile, Worker, estimate

CAPACITY_COOLDOWN_SECONDS = 600.0  # a location that just refused capacity is skipped this long,
MAX_COOLDOWN_SECONDS = 3600.0  # doubling with each refusal in a row, up to this
RESTART_HOURS = 0.1  # boot, install, load state: what each preemption costs a worker
PRIOR_PREEMPTIONS_PER_HOUR = 0.05
PRIOR_HOURS = 5.0  # weight of the prior against observed hours in a location


@dataclass(frozen=True)
class FleetMember:
    request_id: str
    location: str
    price_usd_per_hour: float
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"


@dataclass(frozen=True)
class PlacementContext:
    now: float
    fleet: tuple[FleetMember, ...] = ()
    preemptions: Mapping[str, int] = field(default_factory=dict)
    hours_observed: Mapping[str, float] = field(default_factory=dict)  # instance-hours run per location
    failed_at: Mapping[str, tuple[float, int]] = field(default_factory=dict)  # last refusal, refusals in a row
    workers: int = 1
    samples_done: float = 0.0
    target_samples: float | None = None
    deadline: float | None = None  # wall-clock time the work must be done by
    samples_per_second: float = 0.0  # what the fleet achieves now
    allowed: tuple[str, ...] = ()  # the spec's locations, in the user's order

    def cooling_down(self, location: str) -> bool:
        if location not in self.failed_at:
            return False
        last, in_a_row = self.failed_at[location]
        cooldown = min(MAX_COOLDOWN_SECONDS, CAPACITY_COOLDOWN_SECONDS * 2 ** (in_a_row - 1))
        return self.now - last < cooldown


class PlacementPolicy(Protocol):
    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        """The offer for one more worker, or None to launch nothing."""
        ...

    def retire(self, ctx: PlacementContext) -> list[str]:
        """Request ids of workers to terminate now (a policy changing its mind)."""
        ...


class _NoRetire:
    def retire(self, ctx: PlacementContext) -> list[str]:
        return []


class SpreadCheapest(_NoRetire):
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


def preemption_rate(location: str, ctx: PlacementContext) -> float:
    """Preemptions per instance-hour: a prior, updated by what this run has seen there."""
    events = PRIOR_PREEMPTIONS_PER_HOUR * PRIOR_HOURS + ctx.preemptions.get(location, 0)
    return events / (PRIOR_HOURS + ctx.hours_observed.get(location, 0.0))


def needs_on_demand(ctx: PlacementContext, full_speed_samples_per_second: float,
                    restart_hours: float = RESTART_HOURS) -> bool:
    """The Can't-Be-Late safety net: True once the work left, at the full fleet's pace, no longer
    fits before the deadline with a margin of three restarts (the switch itself and two more)."""
    if ctx.deadline is None or ctx.target_samples is None or full_speed_samples_per_second <= 0:
        return False
    left = max(0.0, ctx.target_samples - ctx.samples_done)
    hours_left = (ctx.deadline - ctx.now) / 3600.0
    return hours_left - 3 * restart_hours < left / full_speed_samples_per_second / 3600.0


class CostPerSamplePlanner(_NoRetire):
    """Pick the offer that minimizes the expected cost per sample of the fleet it joins.

    Expected cost per sample = (instance prices + egress) / (samples/s x (1 - preemption rate x
    restart time)). Backups (workers beyond `ctx.workers`) go to a region, else a zone, that no
    worker uses. When spot cannot finish before the deadline, on-demand offers are used.
    """

    def __init__(self, profile: TaskProfile | None = None):
        self.profile = profile or TaskProfile()

    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        full_speed = self.full_speed(offers, ctx.workers)
        market = "on-demand" if needs_on_demand(ctx, full_speed) else "spot"
        candidates = [o for o in offers if o.market == market
                      and (market == "on-demand" or not ctx.cooling_down(o.location))]
        if not candidates and market == "on-demand":
            candidates = [o for o in offers if o.market == "spot" and not ctx.cooling_down(o.location)]
        if not candidates:
            return None
        if len(ctx.fleet) >= ctx.workers:
            candidates = self._other_failure_domains(candidates, ctx) or candidates
        return self._best(candidates, ctx)

    def full_speed(self, offers: Sequence[Offer], workers: int) -> float:
        """The pace of `workers` of the fastest offered GPU in one zone: the best the job can hope for."""
        if not offers:
            return 0.0
        fastest = max(offers, key=lambda o: self.profile.rate(o.gpu, o.gpu_count))
        location = Location.parse(fastest.location)
        return estimate([Worker(location, fastest.gpu, fastest.gpu_count)] * workers, self.profile).samples_per_second

    def _other_failure_domains(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        used = [Location.parse(m.location) for m in ctx.fleet]
        regions = {(loc.provider, loc.region) for loc in used}
        zones = {str(loc) for loc in used}
        other_region = [o for o in offers if _region_of(o) not in regions]
        return other_region or [o for o in offers if o.location not in zones]

    def _best(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        fleet = [Worker(Location.parse(m.location), m.gpu, m.gpu_count) for m in ctx.fleet]
        fleet_price = sum(m.price_usd_per_hour for m in ctx.fleet)
        # Offers that differ only in price within one (location, GPU) are equivalent but for price.
        cheapest: dict[tuple[str, str | None, int], Offer] = {}
        for o in offers:
            key = (o.location, o.gpu, o.gpu_count)
            if key not in cheapest or o.spot_usd_per_hour < cheapest[key].spot_usd_per_hour:
                cheapest[key] = o
        current_rate = estimate(fleet, self.profile).samples_per_second if fleet else 0.0
        best, best_score, best_rate = None, math.inf, 0.0
        for offer in cheapest.values():
            location = Location.parse(offer.location)
            workers = fleet + [Worker(location, offer.gpu, offer.gpu_count)]
            fleet_estimate = estimate(workers, self.profile)
            survival = max(0.05, 1.0 - preemption_rate(offer.location, ctx) * RESTART_HOURS)
            rate = fleet_estimate.samples_per_second * survival
            cost = fleet_price + offer.spot_usd_per_hour + fleet_estimate.egress_usd_per_hour
            score = cost / rate if rate > 0 else math.inf
            if score < best_score or (score == best_score and best is not None and offer.location < best.location):
                best, best_score, best_rate = offer, score, fleet_estimate.samples_per_second
        spreading = best is not None and best.location not in {m.location for m in ctx.fleet}
        if spreading and fleet and len(ctx.fleet) < ctx.workers and best_rate <= current_rate:
            return None  # a worker that far away would slow the fleet down: wait for capacity nearby
        return best


def _region_of(offer: Offer) -> tuple[str, str]:
    location = Location.parse(offer.location)
    return (location.provider, location.region)


def _registry() -> dict[str, type]:
    from spotrain import baselines

    return {"spotrain": CostPerSamplePlanner, "spread-cheapest": SpreadCheapest,
            "on-demand": baselines.OnDemandOneRegion, "uniform-progress": baselines.UniformProgress,
            "eager-next-region": baselines.EagerNextRegion}


def policy_names() -> list[str]:
    return sorted(_registry())


def get_policy(name: str, profile: TaskProfile | None = None) -> PlacementPolicy:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown placement policy {name!r}; valid: {', '.join(sorted(registry))}")
    cls = registry[name]
    return cls(profile) if cls is CostPerSamplePlanner else cls()
