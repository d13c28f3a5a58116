"""`spotrain plan`: the placement the planner would launch now, and what it would cost and give."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from spotrain.config import ClusterSpec, region_of_zone
from spotrain.errors import SpecError
from spotrain.market import Location, catalog_offers
from spotrain.policies import FleetMember, PlacementContext, get_policy
from spotrain.providers.base import AuthError, Offer
from spotrain.providers.multi import MultiProvider
from spotrain.throughput import Worker, estimate


def offers_for(spec: ClusterSpec, provider: MultiProvider, say: Callable[[str], None]) -> list[Offer]:
    """The offers launch would use: each enabled provider's, in the spec's locations and GPU types.

    The catalog stands in for a provider that is not enabled (to plan where the spec could
    go) or that cannot price without credentials (a dry run needs none); for the latter, only
    the rows that provider would list."""
    live: list[Offer] = []
    priced: set[str] = set()
    for name, member in provider.providers.items():
        try:
            live += member.offers()
        except AuthError as error:
            say(f"{error}; planning with the catalog's prices")
            continue
        priced.add(name)
    catalog = [o for o in catalog_offers("spot") + catalog_offers("on-demand")
               if o.provider not in priced and _would_list(spec, o)]
    return list(spec.usable_offers(live + catalog))


def _would_list(spec: ClusterSpec, offer: Offer) -> bool:
    """A catalog row standing in for an enabled provider passes that provider's own filters (its
    zones, instance types, bid cap, spot only); for a provider not set up, every row is a what-if."""
    settings = getattr(spec.providers, offer.provider, None) if offer.provider in ("aws", "gcp") else None
    return settings is None or settings.would_list(offer)


# What `launch` keeps of the plan, in the ledger's meta under plan_meta_key (the first launch of a
# run writes it): the report compares the run with the plan it started from.
PLANNED_FIGURES = ("samples_per_second", "cost_per_million_samples_usd", "usd_per_hour")


def plan_meta_key(run_id: int) -> str:
    return f"run-{run_id}-plan"


LAUNCHING_PROVIDERS = ("local", "aws", "gcp")  # the catalog's other clouds are only simulated


def unserved_locations(spec: ClusterSpec) -> dict[str, str]:
    """placement.locations that no enabled provider serves, each with what would serve it."""
    served = set(spec.provider_locations())
    found = {}
    for location in spec.placement.locations or ():
        provider, _, zone = location.partition(":")
        region = f"{provider}:{region_of_zone(provider, zone)}" if provider in ("aws", "gcp") else location
        if location in served or region in served:
            continue
        if provider not in LAUNCHING_PROVIDERS:
            found[location] = f"spotrain launches on {', '.join(LAUNCHING_PROVIDERS)} only"
        elif provider in spec.providers.enabled():
            found[location] = f"add {region.partition(':')[2]} to providers.{provider}"
        else:
            found[location] = f"set providers.{provider}"
    return found


def check_launchable(spec: ClusterSpec) -> None:
    """Refuse a spec that would launch nothing somewhere it asks for, before anything is launched."""
    unserved = unserved_locations(spec)
    if unserved:
        raise SpecError(f"placement.locations: no enabled provider serves {_listed(unserved)}")


def check_plannable(spec: ClusterSpec) -> list[str]:
    """Refuse locations no provider of spotrain's launches on; the catalog-only ones of aws and gcp
    stay plannable (a what-if before setting the provider up): returned, for a note."""
    unserved = unserved_locations(spec)
    never = {k: v for k, v in unserved.items() if k.partition(":")[0] not in LAUNCHING_PROVIDERS}
    if never:
        raise SpecError(f"placement.locations: no provider serves {_listed(never)}")
    return [f"{location} is planned from catalog prices: `launch` needs it served ({why})"
            for location, why in unserved.items()]


def _listed(unserved: dict[str, str]) -> str:
    return "; ".join(f"{location} ({why})" for location, why in unserved.items())


def check_budget_covers_a_tick(spec: ClusterSpec, offers: list[Offer], tick_seconds: float) -> None:
    spot = [o.spot_usd_per_hour for o in offers if o.market == "spot"] or [o.spot_usd_per_hour for o in offers]
    if not spot:
        raise SpecError("placement: no offer matches placement.locations and placement.gpu")
    one_tick = min(spot) * tick_seconds / 3600.0
    if spec.budget.total_usd < one_tick:
        raise SpecError(f"budget.total_usd: ${spec.budget.total_usd:g} does not pay one {tick_seconds:g}s tick of "
                        f"the cheapest worker (${min(spot):g}/h)")


def plan(spec: ClusterSpec, offers: list[Offer], now: float = 0.0) -> dict:
    profile = spec.task_profile()
    policy = get_policy(spec.placement.policy, profile)
    ctx = PlacementContext(now=now, workers=spec.placement.workers, allowed=tuple(spec.allowed_locations()))
    chosen: list[Offer] = []
    burn = 0.0
    for n in range(spec.placement.workers + spec.placement.backups):
        candidates = [o for o in offers if spec.budget.max_hourly_usd is None
                      or burn + o.spot_usd_per_hour <= spec.budget.max_hourly_usd]
        offer = policy.choose(candidates, ctx)
        if offer is None:
            break
        chosen.append(offer)
        burn += offer.spot_usd_per_hour
        ctx = replace(ctx, fleet=ctx.fleet + (FleetMember.from_offer(f"plan-{n}", offer),))
    fleet = estimate([Worker(Location.parse(o.location), o.gpu, o.gpu_count) for o in chosen], profile)
    hourly = burn + fleet.egress_usd_per_hour
    per_million = hourly / (fleet.samples_per_second * 3600.0) * 1e6 if fleet.samples_per_second else None
    return {
        "cluster": spec.name,
        "offers": len(offers),
        "policy": spec.placement.policy,
        "placement": [{"location": o.location, "instance_type": o.instance_type, "gpu": o.gpu, "market": o.market,
                       "usd_per_hour": o.spot_usd_per_hour} for o in chosen],
        "usd_per_hour": hourly,
        "egress_usd_per_hour": fleet.egress_usd_per_hour,
        "samples_per_second": fleet.samples_per_second,
        "granularity": None if fleet.granularity == float("inf") else fleet.granularity,
        "cost_per_million_samples_usd": per_million,
        "projected_hours_within_budget": spec.budget.total_usd / hourly if hourly else None,
    }
