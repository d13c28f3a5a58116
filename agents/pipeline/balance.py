"""Who serves which stage: rebalancing as a pure function over the stage records.

A pipeline trains as fast as its slowest stage, and a stage serves as fast as its peers together,
so the predicted pipeline throughput is the minimum over stages of the sum of their peers'
samples/s. A newcomer joins a stage with fewer than two peers if there is one, else the stage
that limits it, and among those first one with no peer in its own region (failure domain), so
that a stage's peers span regions where the fleet does. A serving peer moves to the limiting
stage when the move raises the prediction by at least `min_gain` (Petals moves servers at
1 / 0.75) and its own stage keeps two serving peers; among such moves, one that leaves its stage
a peer in every region the stage spans comes first.

Every peer runs the same function on the same records, and it names one best move for the
whole swarm, so peers that rebalance at about the same time agree on who moves instead of all
leaving the same stage; the caller's jittered period (`rebalance_delay`) spreads the checks so
each sees the records the last move left.

A peer's samples/s is measured on its own stage; on another stage it is predicted by the ratio
of the stages' costs (compute per sample, e.g. from parameter counts; equal by default). A peer
not measured yet counts as fast as its stage's measured peers, and nothing moves before any peer
is measured.
Starting peers count towards throughput (with their own estimate) so that newcomers do not pile
onto one stage, but neither move nor count as a stage's remaining peers; draining ones count
for nothing. Where two stages tie as the slowest, no single move gains: newcomers, which join the
slowest stage, and the controller's launches fill them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence, Set
from dataclasses import dataclass, replace

from spotrain.contracts.stage_records import MIN_PEERS_PER_STAGE, StageRecord
from spotrain.contracts.states import AgentState

PETALS_MIN_GAIN = 1 / 0.75


@dataclass(frozen=True)
class Move:
    peer_id: str
    source: int
    target: int
    throughput_before: float  # predicted pipeline samples/s
    throughput_after: float


def stage_throughputs(records: Sequence[StageRecord], num_stages: int) -> list[float]:
    """Samples/s per stage: the sum over its starting and serving peers.

    fsum is exact, so peers that read the records in another order compute the same numbers.
    """
    speeds: list[list[float]] = [[] for _ in range(num_stages)]
    for record in records:
        if record.state != AgentState.DRAINING and record.stage < num_stages:
            speeds[record.stage].append(record.samples_per_second)
    return [math.fsum(stage) for stage in speeds]


def pipeline_throughput(records: Sequence[StageRecord], num_stages: int) -> float:
    return min(stage_throughputs(records, num_stages))


def stage_for_newcomer(records: Sequence[StageRecord], num_stages: int, domain: str = "") -> int:
    """A stage with fewer than two peers first (one preemption from stopping the pipeline; the
    controller launches VMs for exactly those stages), else the stage that limits the pipeline;
    among those first a stage with no peer in the newcomer's `domain` (its region: a stage whose
    peers span regions survives a region's outage, "" when unknown), then the one with the fewest
    peers, then the first."""
    totals = stage_throughputs(records, num_stages)
    peers = [0] * num_stages
    domains: list[set[str]] = [set() for _ in range(num_stages)]
    for record in records:
        if record.state != AgentState.DRAINING and record.stage < num_stages:
            peers[record.stage] += 1
            domains[record.stage].add(record.domain)
    return min(range(num_stages),
               key=lambda stage: (peers[stage] >= MIN_PEERS_PER_STAGE, bool(domain) and domain in domains[stage],
                                  totals[stage], peers[stage], stage))


def best_move(records: Sequence[StageRecord], num_stages: int, *, min_gain: float = PETALS_MIN_GAIN,
              stage_costs: Sequence[float] | None = None) -> Move | None:
    """The one move that raises the predicted throughput most, if by at least `min_gain`."""
    if min_gain < 1:
        raise ValueError(f"min_gain must be at least 1, got {min_gain}")
    costs = list(stage_costs) if stage_costs is not None else [1.0] * num_stages
    if len(costs) != num_stages or min(costs) <= 0:
        raise ValueError(f"need {num_stages} positive stage costs, got {costs}")
    assumed = with_assumed_speeds(records)
    if assumed is None:
        return None  # nothing measured yet: no prediction to move on
    records = assumed
    totals = stage_throughputs(records, num_stages)
    before = min(totals)
    target = totals.index(before)
    serving = [0] * num_stages
    for record in records:
        if record.state == AgentState.TRAINING and record.stage < num_stages:
            serving[record.stage] += 1
    domain_peers: dict[tuple[int, str], int] = {}
    for record in records:
        if record.state == AgentState.TRAINING and record.domain:
            domain_peers[record.stage, record.domain] = domain_peers.get((record.stage, record.domain), 0) + 1
    candidates: list[tuple[bool, float, float, float, str, Move]] = []
    for record in records:
        source = record.stage
        if record.state != AgentState.TRAINING or source == target or source >= num_stages:
            continue
        if serving[source] - 1 < MIN_PEERS_PER_STAGE:
            continue
        after_totals = list(totals)
        after_totals[source] -= record.samples_per_second
        after_totals[target] += record.samples_per_second * costs[source] / costs[target]
        after = min(after_totals)
        if not (after > before and after >= before * min_gain):
            continue
        move = Move(record.peer_id, source, target, before, after)
        # among moves that gain enough, first one that leaves no stage without a peer in a region it
        # had (a stage spanning regions survives a region's outage); then the best prediction, leave
        # the least-loaded stage, move the slower peer, by id
        strips_region = bool(record.domain) and domain_peers.get((source, record.domain), 0) <= 1
        candidates.append((strips_region, -after, -totals[source], record.samples_per_second, record.peer_id, move))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[:5])[5]


def with_assumed_speeds(records: Sequence[StageRecord]) -> list[StageRecord] | None:
    """The records with each unmeasured peer (0 samples/s: no microbatch served yet) as fast as its
    stage's measured peers (their median; every measured peer's where its stage has none); None
    when no peer is measured. A stage of peers not measured yet is not a stage that serves
    nothing: counted at 0, it drew moves as if it limited the pipeline infinitely (a benchmark's
    fleet, balanced 4/4, ended 5/3 from the trainer's first microbatches: the tail measures its
    peer at once, the head only after the backward)."""
    measured: dict[int, list[float]] = {}
    for record in records:
        if record.state != AgentState.DRAINING and record.samples_per_second > 0:
            measured.setdefault(record.stage, []).append(record.samples_per_second)
    if not measured:
        return None
    every = statistics.median(speed for speeds in measured.values() for speed in speeds)
    return [record if record.samples_per_second > 0 or record.state == AgentState.DRAINING
            else replace(record, samples_per_second=statistics.median(measured.get(record.stage, [every])))
            for record in records]


def should_move(records: Sequence[StageRecord], num_stages: int, peer_id: str, *,
                min_gain: float = PETALS_MIN_GAIN, stage_costs: Sequence[float] | None = None) -> Move | None:
    """The swarm's best move if it is this peer's to make."""
    move = best_move(records, num_stages, min_gain=min_gain, stage_costs=stage_costs)
    return move if move is not None and move.peer_id == peer_id else None


def measured_stage_costs(records: Sequence[StageRecord], num_stages: int) -> list[float]:
    """Seconds per sample of a typical peer on each stage: the inverse of the median samples/s of
    its serving peers, or of all serving peers for a stage none measured. With peers of similar
    speed this is what a peer would serve after a move; `best_move` takes it as `stage_costs`."""
    measured: list[list[float]] = [[] for _ in range(num_stages)]
    for record in records:
        if record.state == AgentState.TRAINING and record.stage < num_stages and record.samples_per_second > 0:
            measured[record.stage].append(record.samples_per_second)
    every = [speed for stage in measured for speed in stage]
    if not every:
        return [1.0] * num_stages
    fallback = statistics.median(every)
    return [1.0 / (statistics.median(stage) if stage else fallback) for stage in measured]


# after a loss, the surviving peers' records need a refresh or two (every 2 s) to show the new speeds
LOSS_SETTLE_SECONDS = 4.0


def rebalance_delay(period: float, jitter: float, draw: float) -> float:
    """Seconds to the next check: `period` spread by +-`jitter` of itself, `draw` uniform in [0, 1)."""
    if not 0 <= jitter < 1 or not 0 <= draw < 1:
        raise ValueError(f"jitter and draw must lie in [0, 1), got {jitter}, {draw}")
    return period * (1 + jitter * (2 * draw - 1))


def next_check_after_loss(next_check: float, now: float, serving_before: Set[str], serving_now: Set[str],
                          draw: float, *, settle: float = LOSS_SETTLE_SECONDS, jitter: float = 0.2) -> float:
    """When to look for a move next: a serving peer gone from the fresh records since the last
    look (killed, draining on a notice) brings the check forward to `settle` seconds (jittered),
    so the pipeline does not wait up to a whole period to refill the stage it lost; otherwise the
    periodic check stands. (One such check per peer may move nobody: `MoveChecks` repeats it.)"""
    if not serving_before - serving_now:
        return next_check
    return min(next_check, now + rebalance_delay(settle, jitter, draw))


@dataclass
class MoveChecks:
    """When a stage peer looks for a move: every `period` (jittered), and after a serving peer
    leaves the fresh records (killed, or draining on a notice) at every records refresh for one
    period, from `next_check_after_loss` on. Peers read the records at different moments, and
    with peers of about the same speed each reading may name another mover (`best_move` ranks
    moves by predicted throughput, which moves with every refresh of a speed): with one check per
    peer after a loss, a benchmark run moved nobody for 40 s. Checking at every refresh, the
    named peer soon reads itself named; its `starting` record then takes the gain from any
    second mover."""

    period: float
    jitter: float = 0.2
    next_check: float = 0.0
    eager_until: float = -math.inf

    @classmethod
    def from_now(cls, period: float, now: float, draw: float, jitter: float = 0.2) -> MoveChecks:
        return cls(period, jitter, next_check=now + rebalance_delay(period, jitter, draw))

    def due(self, now: float, serving_before: Set[str], present_now: Set[str], draw: float) -> bool:
        """Called at every records refresh: look for a move now? A periodic check schedules the next.
        `present_now`: the peers with a fresh record, not draining (one that announced a move is
        not lost)."""
        if serving_before - present_now:
            self.next_check = next_check_after_loss(self.next_check, now, serving_before, present_now, draw,
                                                    jitter=self.jitter)
            self.eager_until = self.next_check + self.period
        if now < self.next_check:
            return False
        if now >= self.eager_until:
            self.next_check = now + rebalance_delay(self.period, self.jitter, draw)
        return True

    def after_loss(self, now: float) -> bool:
        """Within the period of eager checks that a lost serving peer began."""
        return now < self.eager_until


# a peer that moved stays this many periods on its new stage unless a peer is lost meanwhile: speeds
# measured under load swing with the load (a stage short of peers reads slower, then faster once
# filled), and a benchmark run's mover moved back 66 s (3.3 periods) after a move on such speeds
MOVE_HOLD_PERIODS = 5


def may_move_again(moved_at: float | None, now: float, period: float, *, after_loss: bool) -> bool:
    """Whether a peer that last moved at `moved_at` (None: never) may move now: at once after a
    loss (refilling a stage comes first), otherwise once `MOVE_HOLD_PERIODS` periods have passed."""
    return after_loss or moved_at is None or now - moved_at >= MOVE_HOLD_PERIODS * period


def concurrent_movers(decided_on: Sequence[StageRecord], now: Sequence[StageRecord], peer_id: str,
                      target: int) -> list[str]:
    """The peers that go before `peer_id`'s move to `target`: `starting` there in the records read
    after its announcement (`now`), not in those its move was decided on, and with a lower peer id.

    Peers that check at every refresh after a loss can each read records in which neither has
    announced yet and both name themselves (a benchmark run moved two peers at the same second,
    leaving 4/2 instead of 3/3). Each waits a refresh after announcing and reads again: of
    announcements made meanwhile to the same stage, the lowest peer id moves and the others stay;
    whether a second move is still wanted is for the next check, with the first one counted."""
    known = {record.peer_id for record in decided_on if record.state == AgentState.STARTING}
    return sorted(record.peer_id for record in now
                  if record.state == AgentState.STARTING and record.stage == target and record.peer_id != peer_id
                  and record.peer_id not in known and record.peer_id < peer_id)


def stage_for_joining(records: Sequence[StageRecord], num_stages: int, peer_id: str, joined_at: float,
                      domain: str = "") -> int:
    """A newcomer's stage (`stage_for_newcomer`, in its `domain`), counting the serving peers and the
    peers that began joining before it, at the stages their `starting` records name.

    Peers started at once would each see only the serving peers and all pick the same stage. So a
    joining peer keeps its first record's time, and joins are taken in order of (time, peer id):
    an earlier peer's choice never depends on a later one's, so each can decide from the records
    before it, and reading again once the others' records have spread settles a late-seen one.
    """
    earlier = [record for record in records if record.state == AgentState.TRAINING
               or (record.state == AgentState.STARTING and (record.time, record.peer_id) < (joined_at, peer_id))]
    return stage_for_newcomer(earlier, num_stages, domain)
