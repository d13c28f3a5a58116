"""SWARM: the VMs the controller adds so that every stage keeps two peers, and the extras it retires.

Pure functions over the newest stage records and the fleet, for `controller.reconcile`.

A stage with fewer than `MIN_PEERS_PER_STAGE` serving peers (a `training` record of a running VM
that is not draining) is one preemption from stopping the whole pipeline. Every VM that will
serve a stage but serves none yet (requested, booting, restarting its agent, joining or moving,
whose `starting` record may still change its stage, or launched in this same pass) is a peer
already on its way: a newcomer joins a stage under two peers first
(`agents.pipeline.balance.stage_for_newcomer`), so each such VM fills one missing peer. (Counting
`starting` records as peers of their stage made a real fleet of seven launch two VMs more at
its start: agents started together name a first stage, then decide again once they see each
other.) Only what is missing beyond those is launched, and never so many that the live fleet
exceeds the wanted workers plus `MIN_PEERS_PER_STAGE` per stage (the most a pipeline can lack).

Extras are retired when they are no longer needed: while more VMs serve than the wanted
workers, nothing is requested and every stage has its two peers, one stage peer of a stage that
keeps two serving peers without it goes per pass: first one whose stage keeps a peer in its
region (the records' `domain`: a stage spanning regions keeps spanning them), then of the stage
serving the most samples/s (the least loaded), the newest launch. A retired peer drains like a
preempted one (trainers route around it), and no stage falls under two peers by it, so no launch
follows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from spotrain.contracts.stage_records import MIN_PEERS_PER_STAGE, StageRecord
from spotrain.contracts.states import AgentState


@dataclass(frozen=True)
class StageFleet:
    """What the stage rules need of the fleet, as instance ids (the controller fills it)."""

    num_stages: int
    serving: Collection[str]  # running VMs whose agent is not draining
    waiting: int  # live VMs that will serve a stage but are not in the records yet (requested ones too)
    live: int  # requested and running VMs, draining ones left out
    wanted: int  # placement.workers + placement.backups


def live_records(records: Sequence[StageRecord], fleet: StageFleet) -> list[StageRecord]:
    """The records of this fleet's serving VMs that serve a stage now (`training`)."""
    return [r for r in records if r.instance_id in fleet.serving and r.state == AgentState.TRAINING
            and 0 <= r.stage < fleet.num_stages]


def peers_per_stage(records: Sequence[StageRecord], fleet: StageFleet) -> list[int]:
    counts = [0] * fleet.num_stages
    for record in live_records(records, fleet):
        counts[record.stage] += 1
    return counts


def short_stages(records: Sequence[StageRecord], fleet: StageFleet) -> list[int]:
    """The stages under `MIN_PEERS_PER_STAGE` live peers."""
    return [stage for stage, count in enumerate(peers_per_stage(records, fleet)) if count < MIN_PEERS_PER_STAGE]


def stage_peer_launches(records: Sequence[StageRecord], fleet: StageFleet, launching: int = 0) -> int:
    """How many VMs to launch now for stages under two peers, beyond the `launching` ones this pass
    already launches (a replacement fills a stage too)."""
    missing = sum(MIN_PEERS_PER_STAGE - count for count in peers_per_stage(records, fleet)
                  if count < MIN_PEERS_PER_STAGE)
    room = fleet.wanted + MIN_PEERS_PER_STAGE * fleet.num_stages - fleet.live - launching
    return max(0, min(missing - fleet.waiting - launching, room))


def surplus_stage_peer(records: Sequence[StageRecord], fleet: StageFleet, extras: Collection[str],
                       launch_order: Sequence[str]) -> str | None:
    """The instance to retire, if the fleet serves beyond `wanted` while some of `extras` (the
    stage-peer launches) live, nothing waits, and every stage keeps two serving peers without it.
    `launch_order` ranks instance ids oldest first."""
    if len(fleet.serving) <= fleet.wanted or fleet.waiting or not set(extras) & set(fleet.serving):
        return None
    if short_stages(records, fleet):
        return None
    serving = live_records(records, fleet)
    count = [sum(1 for r in serving if r.stage == stage) for stage in range(fleet.num_stages)]
    speed = [sum(r.samples_per_second for r in serving if r.stage == stage) for stage in range(fleet.num_stages)]
    rank = {instance: index for index, instance in enumerate(launch_order)}
    candidates = [r for r in serving if count[r.stage] > MIN_PEERS_PER_STAGE]
    if not candidates:
        return None

    def keeps_domain(record: StageRecord) -> bool:
        """Its stage keeps a peer in its domain without it (or the domain is unknown)."""
        return not record.domain or any(r is not record and r.stage == record.stage and r.domain == record.domain
                                        for r in serving)

    chosen = max(candidates, key=lambda r: (keeps_domain(r), speed[r.stage], count[r.stage], -r.stage,
                                            rank.get(r.instance_id, -1), r.instance_id))
    return chosen.instance_id
