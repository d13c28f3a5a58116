"""reconcile(observed, desired, now) -> actions: the controller's whole decision, as a pure function.

Nothing here touches a clock, a cloud or a database: the control loop (and the simulator)
feed it state and apply what it returns, so every decision is testable from plain values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from spotrain.budget import BudgetGuard
from spotrain.planner import PlacementPolicy
from spotrain.providers.base import Offer

LIVE = ("requested", "running")


@dataclass(frozen=True)
class ObservedInstance:
    request_id: str
    instance_id: str | None
    location: str
    price_usd_per_hour: float
    state: str  # requested | running | preempted | terminated | failed
    agent_state: str | None = None  # from the DHT: starting | training | draining; None = not heard from


@dataclass(frozen=True)
class Observed:
    instances: tuple[ObservedInstance, ...]
    spent_usd: float
    global_epoch: int
    preemptions: dict[str, int] = field(default_factory=dict)  # per location, this run
    launches: int = 0  # launch requests ever made for this cluster (names the next request id)
    duty: tuple[str, ...] = ()  # the instance ids holding checkpoint duty now


@dataclass(frozen=True)
class Desired:
    cluster: str
    workers: int
    backups: int
    offers: tuple[Offer, ...]
    guard: BudgetGuard
    checkpoint_replicas: int
    end_at: float | None = None  # wall-clock end (--duration)
    target_epoch: int | None = None
    stop_requested: bool = False
    initial_fleet_launched: bool = False


@dataclass(frozen=True)
class Launch:
    request_id: str
    offer: Offer
    reason: str  # initial | replacement


@dataclass(frozen=True)
class Terminate:
    request_id: str
    instance_id: str
    reason: str


@dataclass(frozen=True)
class AssignDuty:
    instance_ids: tuple[str, ...]


@dataclass(frozen=True)
class EndRun:
    reason: str


Action = Launch | Terminate | AssignDuty | EndRun


def request_id(cluster: str, sequence: int) -> str:
    return f"{cluster}-r{sequence:05d}"


def burn_usd_per_hour(instances: tuple[ObservedInstance, ...]) -> float:
    return sum(i.price_usd_per_hour for i in instances if i.state in LIVE)


def end_reason(observed: Observed, desired: Desired, now: float) -> str | None:
    if desired.stop_requested:
        return "stopped by user"
    if desired.target_epoch is not None and observed.global_epoch >= desired.target_epoch:
        return f"reached target epoch {desired.target_epoch}"
    if desired.end_at is not None and now >= desired.end_at:
        return "duration reached"
    if desired.guard.must_end(observed.spent_usd, burn_usd_per_hour(observed.instances)):
        return "budget nearly spent"
    return None


def reconcile(observed: Observed, desired: Desired, now: float, policy: PlacementPolicy) -> list[Action]:
    reason = end_reason(observed, desired, now)
    if reason is not None:
        actions: list[Action] = [EndRun(reason)]
        actions += [Terminate(i.request_id, i.instance_id, reason)
                    for i in observed.instances if i.state == "running" and i.instance_id]
        return actions

    actions = []
    running = [i for i in observed.instances if i.state == "running"]
    # A draining worker is already lost: replace it now, not when the cloud reclaims it.
    serving = [i for i in running if i.agent_state != "draining"]
    pending = [i for i in observed.instances if i.state == "requested"]
    live_by_location = Counter(i.location for i in serving + pending)
    burn = burn_usd_per_hour(observed.instances)
    missing = desired.workers + desired.backups - len(serving) - len(pending)
    sequence = observed.launches
    for _ in range(max(0, missing)):
        affordable = [o for o in desired.offers
                      if desired.guard.can_launch(observed.spent_usd, burn, o.spot_usd_per_hour)]
        offer = policy.choose(affordable, live_by_location, observed.preemptions)
        if offer is None:
            break
        actions.append(Launch(request_id(desired.cluster, sequence), offer,
                              "replacement" if desired.initial_fleet_launched else "initial"))
        sequence += 1
        burn += offer.spot_usd_per_hour
        live_by_location[offer.location] += 1

    duty = choose_duty_holders(serving, observed.duty, desired.checkpoint_replicas)
    if duty:
        actions.append(AssignDuty(duty))
    return actions


def choose_duty_holders(serving: list[ObservedInstance], current: tuple[str, ...], replicas: int) -> tuple[str, ...]:
    """Keep holders that still serve; fill up from other locations first (distinct failure domains)."""
    training = [i for i in serving if i.agent_state == "training" and i.instance_id]
    by_id = {i.instance_id: i for i in training}
    holders = [by_id[h] for h in current if h in by_id][:replicas]
    for distinct_location_only in (True, False):
        for candidate in sorted(training, key=lambda i: i.request_id):
            if len(holders) >= replicas:
                break
            taken = {h.location for h in holders}
            if candidate not in holders and not (distinct_location_only and candidate.location in taken):
                holders.append(candidate)
    return tuple(h.instance_id for h in holders if h.instance_id)
