"""The trainer's choice of a peer per stage: least expected busy time, weighted by throughput.

A microbatch sent to a peer finishes after the peer's queue and itself: (queued + 1) / samples
per second. So a fast peer takes more of the work and a busy one less, and the work spreads over
every peer of a stage as queues grow (SWARM's "temporary randomized pipelines" without the dice).
A peer not yet measured is assumed as fast as its stage's measured peers, so it gets tried.

A peer whose call failed is banned for a while, twice as long after each further failure in a
row (a preempted peer stops being tried quickly; a slow but live one comes back), and any
success clears its record. A peer holding `max_in_flight` of this trainer's microbatches takes
no more from it: the trainer waits instead of piling work onto one peer. (The bound is on the
trainer's own calls, known exactly; a queue a peer reported may be stale, and a peer never sent
to again would never report a shorter one: so a reported queue counts for `report_seconds` after
the reply that carried it, and only the trainer's own calls after that.)

What the trainer knows of a peer is kept per stage: a peer that moved to another stage (the same
peer id) starts there unmeasured, unbanned and with an empty queue, instead of inheriting what it
reported, or how its calls failed while it left, on the stage it served before (a moved peer was
once left unused on its new stage for the trainer's next 64 samples).

The decisions are pure functions of the state below and `now`; `RouteTable` only keeps the
trainer's bookkeeping between calls.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerLoad:
    peer_id: str
    samples_per_second: float  # 0 when not measured yet
    queued: int  # microbatches the peer holds, by its last report and our calls in flight
    in_flight: int = 0  # this trainer's calls to the peer not yet answered


@dataclass(frozen=True)
class PeerHealth:
    failures: int = 0  # in a row
    banned_until: float = 0.0


@dataclass(frozen=True)
class RoutingPolicy:
    max_in_flight: int = 4
    ban_seconds: float = 1.0  # after the first failure in a row
    max_ban_seconds: float = 30.0
    report_seconds: float = 2.0  # how long a peer's reported queue counts

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or not 0 < self.ban_seconds <= self.max_ban_seconds or self.report_seconds < 0:
            raise ValueError(f"invalid routing policy {self}")


def expected_finish(load: PeerLoad, assumed_speed: float) -> float:
    """Seconds-per-sample units until a microbatch sent now finishes there."""
    speed = load.samples_per_second if load.samples_per_second > 0 else assumed_speed
    return (load.queued + 1) / speed


def choose_peer(loads: Sequence[PeerLoad], health: Mapping[str, PeerHealth], now: float,
                policy: RoutingPolicy, exclude: Collection[str] = (), prefer: str | None = None) -> str | None:
    """The usable peer that would finish a microbatch first; None if every one is banned or full.

    `prefer` wins whenever it is usable: a backward goes back to the peer whose parameters made
    the forward, and the load it adds was weighed when that forward was routed.
    """
    measured = [load.samples_per_second for load in loads if load.samples_per_second > 0]
    assumed = statistics.median(measured) if measured else 1.0
    usable = [load for load in loads
              if load.peer_id not in exclude and load.in_flight < policy.max_in_flight
              and health.get(load.peer_id, PeerHealth()).banned_until <= now]
    if not usable:
        return None
    if any(load.peer_id == prefer for load in usable):
        return prefer
    return min(usable, key=lambda load: (expected_finish(load, assumed), load.peer_id)).peer_id


def saturated(loads: Sequence[PeerLoad], health: Mapping[str, PeerHealth], now: float,
              policy: RoutingPolicy) -> bool:
    """Some peer is not banned and every such peer holds `max_in_flight` of our calls: the stage is
    busy, not failing (a call waits for a slot, however long; it gives up only when none is usable)."""
    live = [load for load in loads if health.get(load.peer_id, PeerHealth()).banned_until <= now]
    return bool(live) and all(load.in_flight >= policy.max_in_flight for load in live)


def after_failure(health: PeerHealth, now: float, policy: RoutingPolicy) -> PeerHealth:
    ban = min(policy.ban_seconds * 2 ** health.failures, policy.max_ban_seconds)
    return PeerHealth(failures=health.failures + 1, banned_until=now + ban)


Route = tuple[int, str]  # (stage, peer id): what the trainer knows of a peer holds on one stage


@dataclass
class RouteTable:
    """What one trainer knows of the peers it sends to, per stage: their reports, its calls in
    flight, failures."""

    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    reported: dict[Route, PeerLoad] = field(default_factory=dict)
    reported_at: dict[Route, float] = field(default_factory=dict)
    in_flight: dict[Route, int] = field(default_factory=dict)
    health: dict[Route, PeerHealth] = field(default_factory=dict)

    def choose(self, stage: int, peers: Sequence[str], now: float, exclude: Collection[str] = (),
               prefer: str | None = None) -> str | None:
        return choose_peer(*self._known(stage, peers, now), now, self.policy, exclude, prefer)

    def saturated(self, stage: int, peers: Sequence[str], now: float) -> bool:
        return saturated(*self._known(stage, peers, now), now, self.policy)

    def _known(self, stage: int, peers: Sequence[str], now: float) -> tuple[list[PeerLoad], dict[str, PeerHealth]]:
        loads = [self.load(stage, peer, now) for peer in peers]
        health = {peer: known for peer in peers if (known := self.health.get((stage, peer))) is not None}
        return loads, health

    def load(self, stage: int, peer: str, now: float) -> PeerLoad:
        known = self.reported.get((stage, peer), PeerLoad(peer, 0.0, 0))
        ours = self.in_flight.get((stage, peer), 0)
        fresh = now - self.reported_at.get((stage, peer), now) <= self.policy.report_seconds
        # our calls are part of the queue the peer reports, when they were there at its report
        return PeerLoad(peer, known.samples_per_second, max(known.queued if fresh else 0, ours), ours)

    def sent(self, stage: int, peer: str) -> None:
        self.in_flight[stage, peer] = self.in_flight.get((stage, peer), 0) + 1

    def succeeded(self, stage: int, peer: str, samples_per_second: float, queued: int, now: float) -> None:
        """A reply, with the load the peer reported in it."""
        self._returned(stage, peer)
        self.reported[stage, peer] = PeerLoad(peer, samples_per_second, queued)
        self.reported_at[stage, peer] = now
        self.health.pop((stage, peer), None)

    def failed(self, stage: int, peer: str, now: float) -> None:
        self._returned(stage, peer)
        self.health[stage, peer] = after_failure(self.health.get((stage, peer), PeerHealth()), now, self.policy)

    def _returned(self, stage: int, peer: str) -> None:
        self.in_flight[stage, peer] = max(self.in_flight.get((stage, peer), 0) - 1, 0)
