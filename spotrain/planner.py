"""Placement policies: which offer the next worker gets, and which workers to retire.

Every policy sees the same PlacementContext (the fleet, preemptions and capacity failures per
location, progress against the deadline) and is registered by name. `spotrain`, the default
for clouds, minimizes the expected cost per sample of the whole placement, egress included;
`spread-cheapest` is the simple spread used for the local provider.

Placement is revised while the run goes on, make before break: `migrate` proposes extra workers
(a cheaper place, or one that holds the whole fleet when the current one cannot), and `retire`
drops the workers they replace only once the newcomers train, so a move never stalls training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from spotrain.market import Location
from spotrain.providers.base import Offer
from spotrain.throughput import TaskProfile, Worker, estimate

CAPACITY_COOLDOWN_SECONDS = 600.0  # a location that just refused capacity is skipped this long,
MAX_COOLDOWN_SECONDS = 3600.0  # doubling with each refusal in a row, up to this
RESTART_HOURS = 0.1  # boot, install, load state: what each preemption costs a worker
PRIOR_PREEMPTIONS_PER_HOUR = 0.05
PRIOR_HOURS = 5.0  # weight of the prior against observed hours in a location
MOVE_MARGIN = 0.02  # a move must gain this share of cost (or time) after paying for itself
DEFAULT_HORIZON_HOURS = 24.0  # work assumed left when the spec sets no target
WAIT_PREMIUM = 0.05  # with slack, a place dearer per sample than the cheapest by more than this waits
WAIT_SLACK_SHARE = 0.25  # ... while the slack exceeds this share of the time left


@dataclass(frozen=True)
class FleetMember:
    request_id: str
    location: str
    price_usd_per_hour: float
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"
    training: bool = False  # its agent reports training (not starting, not yet launched)

    @classmethod
    def from_offer(cls, request_id: str, offer: Offer) -> FleetMember:
        """The member an offer becomes once launched (not yet training)."""
        return cls(request_id, offer.location, offer.spot_usd_per_hour, offer.gpu, offer.gpu_count, offer.market)


@dataclass(frozen=True)
class PlacementContext:
    now: float
    fleet: tuple[FleetMember, ...] = ()
    preemptions: Mapping[str, int] = field(default_factory=dict)
    hours_observed: Mapping[str, float] = field(default_factory=dict)  # instance-hours run per location
    failed_at: Mapping[str, tuple[float, int]] = field(default_factory=dict)  # last refusal, refusals in a row
    workers: int = 1
    backups: int = 0
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

    def migrate(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        """Offers for extra workers beyond the wanted fleet, to replace part of it (make before break)."""
        ...


class SteadyPolicy:
    """A policy that never revises a placement it made."""

    def retire(self, ctx: PlacementContext) -> list[str]:
        return []

    def migrate(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        return []


class SpreadCheapest(SteadyPolicy):
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


def has_slack(ctx: PlacementContext, full_speed_samples_per_second: float,
              share: float = WAIT_SLACK_SHARE) -> bool:
    """True while the time to the deadline exceeds the work left at full speed by more than
    `share` of that time: the job can afford to wait for a better offer."""
    if ctx.deadline is None or ctx.target_samples is None or full_speed_samples_per_second <= 0:
        return False
    hours_left = (ctx.deadline - ctx.now) / 3600.0
    work_hours = max(0.0, ctx.target_samples - ctx.samples_done) / full_speed_samples_per_second / 3600.0
    return hours_left - work_hours > share * hours_left


class CostPerSamplePlanner:
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
        cooling = {location for location in ctx.failed_at if ctx.cooling_down(location)}
        candidates = [o for o in offers if o.market == market
                      and (market == "on-demand" or o.location not in cooling)]
        if not candidates and market == "on-demand":
            candidates = [o for o in offers if o.market == "spot" and o.location not in cooling]
        if not candidates:
            return None
        if len(ctx.fleet) >= ctx.workers:
            candidates = self._other_failure_domains(candidates, ctx) or candidates
            return self._best(candidates, ctx)
        best = self._best(candidates, ctx)
        if best is not None and best.market == "spot" and has_slack(ctx, full_speed):
            ideal = min(self._usd_per_sample(o) for o in offers if o.market == "spot")
            if self._usd_per_sample(best) > ideal * (1.0 + WAIT_PREMIUM):
                return None  # well ahead of the deadline: wait for the cheaper place to have room again
        return best

    def _usd_per_sample(self, offer: Offer) -> float:
        return offer.spot_usd_per_hour / self.profile.rate(offer.gpu, offer.gpu_count)

    def full_speed(self, offers: Sequence[Offer], workers: int) -> float:
        """The pace of `workers` of the fastest offered GPU in one zone: the best the job can hope for."""
        if not offers:
            return 0.0
        kinds = {(o.gpu, o.gpu_count): o for o in offers}  # one offer per GPU kind: rate is all that counts
        fastest = max(kinds.values(), key=lambda o: self.profile.rate(o.gpu, o.gpu_count))
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

    # -- revising the placement (make before break) --------------------------------------
    def migrate(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        """Extra workers that would replace part of a settled fleet: where a fresh plan is cheaper
        per sample, the move included, or where it holds more of an incomplete fleet and so
        finishes sooner. Fleets with backups are left as they are."""
        if not _revisable(ctx):
            return []
        if needs_on_demand(ctx, self.full_speed(offers, ctx.workers)):
            return []
        fresh = self._fresh_plan(offers, ctx)
        kept, new = _match(fresh, ctx.fleet)
        if not new or len(kept) + len(new) < len(ctx.fleet):
            return []
        moved = kept + [FleetMember.from_offer(f"move-{n}", o) for n, o in enumerate(new)]
        now_usd, now_rate = self.fleet_score(ctx.fleet, ctx)
        then_usd, then_rate = self.fleet_score(moved, ctx)
        if now_rate <= 0 or then_rate <= 0:
            return []
        left = (ctx.target_samples - ctx.samples_done if ctx.target_samples is not None
                else now_rate * DEFAULT_HORIZON_HOURS * 3600.0)
        move_usd = sum(o.spot_usd_per_hour for o in new) * RESTART_HOURS  # newcomers paid while they boot
        # cheaper by price, not only by the (noisy) preemption estimates: equal prices never move
        cheaper = (then_usd * left + move_usd < now_usd * left * (1.0 - MOVE_MARGIN)
                   and self.fleet_score(moved, ctx, risk=False)[0]
                   < self.fleet_score(ctx.fleet, ctx, risk=False)[0])
        sooner = (len(ctx.fleet) < ctx.workers and len(moved) > len(ctx.fleet)
                  and left / then_rate + RESTART_HOURS * 3600.0 < left / now_rate * (1.0 - MOVE_MARGIN))
        return new if cheaper or sooner else []

    def retire(self, ctx: PlacementContext) -> list[str]:
        """Once every worker trains: beyond the wanted size keep the fullest fleet, cheapest per
        sample among equals (newcomers win ties), then drop a far region that only slows the rest."""
        if not _revisable(ctx):
            return []
        keep = self._fastest_part(self._best_fleet(ctx.fleet, ctx.workers, ctx), ctx)
        return [m.request_id for m in ctx.fleet if m not in keep]

    def fleet_score(self, members: Sequence[FleetMember], ctx: PlacementContext,
                    risk: bool = True) -> tuple[float, float]:
        """(expected USD per sample, samples/s) of a fleet, egress and (with `risk`) the
        preemption estimates included."""
        if not members:
            return math.inf, 0.0
        workers = [Worker(Location.parse(m.location), m.gpu, m.gpu_count) for m in members]
        fleet = estimate(workers, self.profile)
        survival = (sum(max(0.05, 1.0 - preemption_rate(m.location, ctx) * RESTART_HOURS) for m in members)
                    if risk else len(members))
        rate = fleet.samples_per_second * survival / len(members)
        cost = sum(m.price_usd_per_hour for m in members) + fleet.egress_usd_per_hour
        return (cost / 3600.0 / rate if rate > 0 else math.inf), fleet.samples_per_second

    def _fresh_plan(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        """The placement this planner would choose now for an empty fleet."""
        plan: list[Offer] = []
        scratch = replace(ctx, fleet=())
        for n in range(ctx.workers):
            offer = self.choose(offers, scratch)
            if offer is None:
                break
            plan.append(offer)
            scratch = replace(scratch, fleet=scratch.fleet + (FleetMember.from_offer(f"plan-{n}", offer),))
        return plan

    def _best_fleet(self, members: Sequence[FleetMember], size: int,
                    ctx: PlacementContext) -> list[FleetMember]:
        """At most `size` members: the greedy cheapest fleet, or everything in one zone or one
        region (what a move brought in); the fullest wins, then the cheapest per sample."""
        newest_first = sorted(members, key=lambda m: m.request_id, reverse=True)
        if len(members) <= size:
            return newest_first
        parts: dict[tuple[str, ...], list[FleetMember]] = {}
        for m in newest_first:
            location = Location.parse(m.location)
            for key in ((str(location),), (location.provider, location.region)):
                parts.setdefault(key, []).append(m)
        candidates = [self._greedy(newest_first, size, ctx)] + [part[:size] for part in parts.values()]
        return min(candidates, key=lambda fleet: (-len(fleet), self.fleet_score(fleet, ctx)[0]))

    def _greedy(self, pool: list[FleetMember], size: int, ctx: PlacementContext) -> list[FleetMember]:
        pool = list(pool)
        chosen: list[FleetMember] = []
        while pool and len(chosen) < size:
            best = min(pool, key=lambda m: self.fleet_score(chosen + [m], ctx)[0])  # newest wins ties
            chosen.append(best)
            pool.remove(best)
        return chosen

    def _fastest_part(self, members: list[FleetMember], ctx: PlacementContext) -> list[FleetMember]:
        """The fleet, or the one region of it that trains faster alone (newest region on ties)."""
        regions: dict[tuple[str, str], list[FleetMember]] = {}
        for m in sorted(members, key=lambda m: m.request_id, reverse=True):
            location = Location.parse(m.location)
            regions.setdefault((location.provider, location.region), []).append(m)
        if len(regions) < 2:
            return members
        best, best_rate = members, self.fleet_score(members, ctx)[1] * (1.0 + MOVE_MARGIN)
        for part in regions.values():
            rate = self.fleet_score(part, ctx)[1]
            if rate > best_rate:
                best, best_rate = part, rate
        return best


def _revisable(ctx: PlacementContext) -> bool:
    """A fleet without backups whose every worker trains: the only kind a policy may revise."""
    return not ctx.backups and bool(ctx.fleet) and all(m.training for m in ctx.fleet)


def _match(plan: Sequence[Offer], fleet: Sequence[FleetMember]) -> tuple[list[FleetMember], list[Offer]]:
    """Members that already sit where the plan puts a worker, and the plan's offers left to launch."""
    free = list(fleet)
    kept: list[FleetMember] = []
    new: list[Offer] = []
    for offer in plan:
        same = next((m for m in free if (m.location, m.gpu, m.gpu_count, m.market)
                     == (offer.location, offer.gpu, offer.gpu_count, offer.market)), None)
        if same is None:
            new.append(offer)
        else:
            free.remove(same)
            kept.append(same)
    return kept, new


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
