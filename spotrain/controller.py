"""reconcile(observed, desired, now) -> actions: the controller's whole decision, as a pure function.

Nothing here touches a clock, a cloud or a database: the control loop (and the simulator)
feed it state and apply what it returns, so every decision is testable from plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from spotrain.budget import BudgetGuard
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import LIVE_STATES, AgentState, EndReason, InstanceState, LaunchReason
from spotrain.policies import FleetMember, PlacementContext, PlacementPolicy
from spotrain.providers.base import Offer
from spotrain.stage_fleet import StageFleet, live_records, stage_peer_launches, surplus_stage_peer
from spotrain.store_domains import failure_domain


@dataclass(frozen=True)
class ObservedInstance:
    request_id: str
    instance_id: str | None
    location: str
    price_usd_per_hour: float
    state: InstanceState
    agent_state: AgentState | None = None  # from the DHT; None = not heard from
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"
    role: str | None = None  # swarm mode: the role its user-data named ("trainer" or "stage"); None: unknown
    reason: LaunchReason | None = None  # why it was launched


@dataclass(frozen=True)
class Observed:
    instances: tuple[ObservedInstance, ...]
    spent_usd: float
    global_epoch: int
    preemptions: dict[str, int] = field(default_factory=dict)  # per location, this run
    launches: int = 0  # launch requests ever made for this cluster (names the next request id)
    duty: tuple[str, ...] = ()  # the instance ids holding checkpoint duty now
    samples: float = 0.0  # samples trained in this run
    samples_per_second: float = 0.0  # the fleet's pace now
    hours_observed: dict[str, float] = field(default_factory=dict)  # instance-hours per location, this run
    failed_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # last refusal, refusals in a row
    egress_usd_per_hour: float = 0.0  # what the fleet's traffic costs now (spotrain.egress, charged in the ledger)
    stage_records: tuple[StageRecord, ...] = ()  # swarm mode: the newest record of each stage peer


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
    target_samples: float | None = None
    deadline: float | None = None  # when target_samples must be done (planning input, not a stop)
    stop_requested: bool = False
    initial_fleet_launched: bool = False
    allowed: tuple[str, ...] = ()  # the spec's locations in the user's order
    # the store a duty holder at a location writes (StorePlacement.write_store): one store, one copy
    checkpoint_store_of: Callable[[str], str] = failure_domain
    stages: int = 0  # swarm mode: the pipeline's stages, each kept at two peers (spotrain.stage_fleet); 0: off


@dataclass(frozen=True)
class Launch:
    request_id: str
    offer: Offer
    reason: LaunchReason  # initial | replacement | migration | stage peers


@dataclass(frozen=True)
class Terminate:
    request_id: str
    instance_id: str
    reason: EndReason  # RETIRED, SURPLUS_STAGE_PEER or RUN_ENDED


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
    return sum(i.price_usd_per_hour for i in instances if i.state in LIVE_STATES)


def fleet_burn_usd_per_hour(observed: Observed) -> float:
    """Instance time and egress: what the budget guard reserves for."""
    return burn_usd_per_hour(observed.instances) + observed.egress_usd_per_hour


def egress_per_instance_usd_per_hour(observed: Observed) -> float:
    """What one more instance is expected to add in egress: the live fleet's mean."""
    live = sum(1 for i in observed.instances if i.state in LIVE_STATES)
    return observed.egress_usd_per_hour / live if live else 0.0


def end_reason(observed: Observed, desired: Desired, now: float) -> str | None:
    if desired.stop_requested:
        return "stopped by user"
    if desired.target_epoch is not None and observed.global_epoch >= desired.target_epoch:
        return f"reached target epoch {desired.target_epoch}"
    if desired.target_samples is not None and observed.samples >= desired.target_samples:
        return "reached target samples"
    if desired.end_at is not None and now >= desired.end_at:
        return "duration reached"
    if desired.guard.must_end(observed.spent_usd, fleet_burn_usd_per_hour(observed)):
        return "budget nearly spent"
    return None


def reconcile(observed: Observed, desired: Desired, now: float, policy: PlacementPolicy) -> list[Action]:
    reason = end_reason(observed, desired, now)
    if reason is not None:
        ending: list[Action] = [EndRun(reason)]
        ending += [Terminate(i.request_id, i.instance_id, EndReason.RUN_ENDED)
                   for i in observed.instances if i.state == InstanceState.RUNNING and i.instance_id]
        return ending

    actions: list[Action] = []
    running = [i for i in observed.instances if i.state == InstanceState.RUNNING]
    # A draining worker is already lost: replace it now, not when the cloud reclaims it.
    serving = [i for i in running if i.agent_state != AgentState.DRAINING]
    pending = [i for i in observed.instances if i.state == InstanceState.REQUESTED]
    ctx = placement_context(observed, desired, now, serving + pending)
    retired = set(policy.retire(ctx))
    surplus = None if retired else surplus_stage_peer_of(observed, desired, serving, pending)
    for instance in serving:
        if instance.request_id in retired and instance.instance_id:
            actions.append(Terminate(instance.request_id, instance.instance_id, EndReason.RETIRED))
        elif surplus is not None and instance.instance_id == surplus:
            actions.append(Terminate(instance.request_id, surplus, EndReason.SURPLUS_STAGE_PEER))
    serving = [i for i in serving if i.request_id not in retired and (surplus is None or i.instance_id != surplus)]
    launches = Launches(observed, desired, policy, placement_context(observed, desired, now, serving + pending))
    missing = desired.workers + desired.backups - len(serving) - len(pending)
    launches.add(missing, LaunchReason.REPLACEMENT if desired.initial_fleet_launched else LaunchReason.INITIAL)
    if desired.stages:
        fleet = stage_fleet_of(observed, desired, serving, pending)
        launches.add(stage_peer_launches(observed.stage_records, fleet, len(launches.actions)),
                     LaunchReason.STAGE_PEERS)
    if not launches.actions and not pending:  # a settled fleet: the policy may move part of it
        launches.add_offers(policy.migrate(desired.offers, launches.ctx), LaunchReason.MIGRATION)
    actions += launches.actions

    duty = choose_duty_holders(serving, observed.duty, desired.checkpoint_replicas, desired.checkpoint_store_of)
    if duty:
        actions.append(AssignDuty(duty))
    return actions


class Launches:
    """The launches of one pass: each offer chosen by the policy among those the budget guard
    allows, the burn and the fleet updated after each, request ids numbered in order."""

    def __init__(self, observed: Observed, desired: Desired, policy: PlacementPolicy, ctx: PlacementContext):
        self.observed, self.desired, self.policy, self.ctx = observed, desired, policy, ctx
        self.burn = fleet_burn_usd_per_hour(observed)
        self.egress_each = egress_per_instance_usd_per_hour(observed)
        self.actions: list[Launch] = []

    def affordable(self, offer: Offer) -> bool:
        return self.desired.guard.can_launch(self.observed.spent_usd, self.burn,
                                             offer.spot_usd_per_hour + self.egress_each)

    def add(self, count: int, reason: LaunchReason) -> None:
        """Up to `count` launches, each the policy's choice of what the money left can pay for."""
        for _ in range(max(0, count)):
            offer = self.policy.choose([o for o in self.desired.offers if self.affordable(o)], self.ctx)
            if offer is None:
                break
            self._launch(offer, reason)

    def add_offers(self, offers: list[Offer], reason: LaunchReason) -> None:
        """These offers in order, until the first the budget guard refuses."""
        for offer in offers:
            if not self.affordable(offer):
                break
            self._launch(offer, reason)

    def _launch(self, offer: Offer, reason: LaunchReason) -> None:
        request = request_id(self.desired.cluster, self.observed.launches + len(self.actions))
        self.actions.append(Launch(request, offer, reason))
        self.burn += offer.spot_usd_per_hour + self.egress_each
        self.ctx = replace(self.ctx, fleet=self.ctx.fleet + (FleetMember.from_offer(request, offer),))


def stage_fleet_of(observed: Observed, desired: Desired, serving: list[ObservedInstance],
                   pending: list[ObservedInstance]) -> StageFleet:
    """The fleet as the stage rules see it: a live VM that will serve a stage (not a trainer) and
    serves none yet is a peer on its way."""
    serving_ids = {i.instance_id for i in serving if i.instance_id}
    fleet = StageFleet(desired.stages, serving_ids, 0, len(serving) + len(pending),
                       desired.workers + desired.backups)
    recorded = {r.instance_id for r in live_records(observed.stage_records, fleet)}
    waiting = [i for i in serving + pending if i.role != "trainer" and i.instance_id not in recorded]
    return replace(fleet, waiting=len(waiting))


def surplus_stage_peer_of(observed: Observed, desired: Desired, serving: list[ObservedInstance],
                          pending: list[ObservedInstance]) -> str | None:
    """Swarm mode: a stage peer launched beyond the wanted workers that is no longer needed."""
    if not desired.stages:
        return None
    fleet = stage_fleet_of(observed, desired, serving, pending)
    extras = [i.instance_id for i in serving if i.reason == LaunchReason.STAGE_PEERS and i.instance_id]
    order = [i.instance_id for i in sorted(serving, key=lambda i: i.request_id) if i.instance_id]
    return surplus_stage_peer(observed.stage_records, fleet, extras, order)


def placement_context(observed: Observed, desired: Desired, now: float,
                      fleet: list[ObservedInstance]) -> PlacementContext:
    preemptions = observed.preemptions
    return PlacementContext(
        now=now,
        fleet=tuple(FleetMember(i.request_id, i.location, i.price_usd_per_hour, i.gpu, i.gpu_count, i.market,
                                training=i.state == InstanceState.RUNNING and i.agent_state == AgentState.TRAINING)
                    for i in fleet),
        preemptions=preemptions, hours_observed=observed.hours_observed, failed_at=observed.failed_at,
        workers=desired.workers, backups=desired.backups, samples_done=observed.samples,
        target_samples=desired.target_samples,
        deadline=desired.deadline, samples_per_second=observed.samples_per_second, allowed=desired.allowed,
    )


def choose_duty_holders(serving: list[ObservedInstance], current: tuple[str, ...], replicas: int,
                        store_of: Callable[[str], str] = failure_domain) -> tuple[str, ...]:
    """Up to `replicas` training agents, each writing a store no other holder writes (a copy in
    another failure domain); only when the stores run out, one in another location, then any.
    Current holders come first within each round, so duty moves only to add a domain: a holder
    that shares its store with another gives way to an agent in a domain that has no copy."""
    training = [i for i in serving if i.agent_state == AgentState.TRAINING and i.instance_id]
    by_id = {i.instance_id: i for i in training}
    kept = [by_id[h] for h in current if h in by_id]
    candidates = kept + sorted((i for i in training if i not in kept), key=lambda i: i.request_id)
    holders: list[ObservedInstance] = []
    for key in (lambda i: store_of(i.location), lambda i: i.location, lambda i: i.request_id):
        for candidate in candidates:
            if len(holders) >= replicas:
                break
            if candidate not in holders and key(candidate) not in {key(h) for h in holders}:
                holders.append(candidate)
    return tuple(h.instance_id for h in holders if h.instance_id)
