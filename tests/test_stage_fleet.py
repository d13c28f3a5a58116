"""SWARM: the controller keeps two peers per stage (reconcile is pure: plain values in, actions out)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from spotrain.budget import BudgetGuard
from spotrain.contracts.stage_records import MIN_PEERS_PER_STAGE, StageRecord
from spotrain.contracts.states import AgentState, EndReason, InstanceState, LaunchReason
from spotrain.controller import Desired, Launch, Observed, ObservedInstance, Terminate, reconcile
from spotrain.policies.spread import SpreadCheapest
from spotrain.providers.base import Offer

OFFER = Offer("local", "local:zone-a", "local.cpu", None, 0.5)
RICH = BudgetGuard(total_usd=100.0, tick_seconds=2.0, termination_lag_seconds=13.0)
STAGES, TRAINERS = 3, 1
WANTED = 2 * STAGES + TRAINERS


def desired(guard: BudgetGuard = RICH, workers: int = WANTED) -> Desired:
    return Desired(cluster="c", workers=workers, backups=0, offers=(OFFER,), guard=guard, checkpoint_replicas=1,
                   initial_fleet_launched=True, stages=STAGES)


def vm(n: int, role: str = "stage", state: InstanceState = InstanceState.RUNNING,
       agent: AgentState | None = AgentState.TRAINING, reason: LaunchReason = LaunchReason.INITIAL) -> ObservedInstance:
    return ObservedInstance(f"c-r{n:05d}", f"i-{n}" if state != InstanceState.REQUESTED else None, "local:zone-a",
                            0.5, state, agent, role=role, reason=reason)


def rec(n: int, stage: int, state: AgentState = AgentState.TRAINING, speed: float = 10.0) -> StageRecord:
    return StageRecord(stage, f"peer-{n}", f"i-{n}", speed, 0, state, 0.0)


def fleet(stages_of: list[int]) -> tuple[list[ObservedInstance], list[StageRecord]]:
    """A trainer (vm 0) and one stage peer per entry, serving the stage it names."""
    vms = [vm(0, role="trainer")] + [vm(n + 1) for n in range(len(stages_of))]
    return vms, [rec(n + 1, stage) for n, stage in enumerate(stages_of)]


def observed(vms: list[ObservedInstance], records: list[StageRecord], spent: float = 0.0) -> Observed:
    return Observed(instances=tuple(vms), spent_usd=spent, global_epoch=0, launches=len(vms),
                    stage_records=tuple(records))


def launches(actions: list) -> list[Launch]:
    return [a for a in actions if isinstance(a, Launch)]


def run(obs: Observed, des: Desired | None = None) -> list:
    return reconcile(obs, des or desired(), 0.0, SpreadCheapest())


def test_a_stage_under_two_peers_gets_a_vm_with_a_typed_reason():
    vms, records = fleet([0, 0, 0, 1, 1, 2])  # stage 2 has one peer; the fleet is complete
    (launch,) = launches(run(observed(vms, records)))
    assert launch.reason is LaunchReason.STAGE_PEERS and launch.request_id == "c-r00007"


def test_what_is_missing_is_launched_and_no_more():
    vms, records = fleet([0, 0, 0, 0, 1, 1])  # stage 2 has none: two missing
    assert [a.reason for a in launches(run(observed(vms, records)))] == [LaunchReason.STAGE_PEERS] * 2


def test_a_vm_on_its_way_counts_as_the_missing_peer():
    vms, records = fleet([0, 0, 0, 1, 1, 2])
    booting = vm(8, agent=AgentState.STARTING, reason=LaunchReason.STAGE_PEERS)  # not in the records yet
    assert launches(run(observed(vms + [booting], records))) == []
    requested = vm(8, state=InstanceState.REQUESTED, agent=None)
    assert launches(run(observed(vms + [requested], records))) == []
    joined = [*records, rec(8, 2, AgentState.STARTING)]  # joining: still on its way
    assert launches(run(observed(vms + [booting], joined))) == []


def test_peers_still_joining_are_on_their_way_whatever_stage_they_first_named():
    # a fleet started at once: each agent names a first stage, then decides again once it sees
    # the others (a real fleet of seven once showed 1/4/0 here)
    vms, _ = fleet([0] * 6)
    joining = [rec(n + 1, stage, AgentState.STARTING) for n, stage in enumerate([0, 1, 1, 1, 1, 0])]
    assert launches(run(observed(vms, joining))) == []


def test_a_replacement_launched_in_the_same_pass_fills_the_stage():
    vms, records = fleet([0, 0, 1, 1, 2, 2])
    lost = vms[6]  # stage 2's second peer was preempted: its record is still in the DHT
    survivors = [v for v in vms if v is not lost]
    actions = launches(run(observed(survivors + [vm(6, state=InstanceState.PREEMPTED, agent=None)], records)))
    assert [a.reason for a in actions] == [LaunchReason.REPLACEMENT]


def test_a_draining_peer_is_not_a_peer_and_its_replacement_is_on_its_way():
    vms, records = fleet([0, 0, 1, 1, 2, 2])
    vms[6] = vm(6, agent=AgentState.DRAINING)
    records[5] = rec(6, 2, AgentState.DRAINING)
    assert [a.reason for a in launches(run(observed(vms, records)))] == [LaunchReason.REPLACEMENT]


def test_a_trainer_without_a_stage_record_is_not_on_its_way_to_a_stage():
    vms, records = fleet([0, 0, 0, 1, 1, 2])
    vms.append(vm(9, role="trainer"))
    assert [a.reason for a in launches(run(observed(vms, records), desired(workers=WANTED + 1)))] == [
        LaunchReason.STAGE_PEERS]


def test_records_of_vms_that_ended_or_other_clusters_count_for_nothing():
    vms, records = fleet([0, 0, 1, 1, 2, 2])
    vms[6] = vm(6, state=InstanceState.TERMINATED, agent=None)
    strangers = [rec(40, 2), rec(41, 2)]  # no such instance in this fleet
    actions = launches(run(observed(vms, records + strangers)))
    assert [a.reason for a in actions] == [LaunchReason.REPLACEMENT]


def test_extra_launches_stay_within_the_budget():
    vms, records = fleet([0, 0, 0, 0, 1, 1])  # two missing on stage 2
    burn = 0.5 * len(vms)
    # the money left pays for the fleet and one more VM over the guard's horizon, not two
    horizon_hours = (2 * 2.0 + 13.0 + 10 * 2.0) / 3600.0
    guard = BudgetGuard(total_usd=1.0 + (burn + 0.75) * horizon_hours, tick_seconds=2.0, termination_lag_seconds=13.0)
    assert guard.can_launch(1.0, burn, 0.5) and not guard.can_launch(1.0, burn + 0.5, 0.5)
    assert len(launches(run(observed(vms, records, spent=1.0), desired(guard)))) == 1
    capped = BudgetGuard(total_usd=100.0, tick_seconds=2.0, termination_lag_seconds=13.0, max_hourly_usd=burn)
    assert launches(run(observed(vms, records), desired(capped))) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, STAGES - 1), max_size=12), st.integers(0, 6), st.integers(0, 4))
def test_the_fleet_never_exceeds_the_cap_and_every_short_stage_is_covered(stages_of, unrecorded, extra_workers):
    """Whatever the records say: live VMs after the pass stay within workers + 2 per stage, and
    either every missing peer has a VM on its way or the cap was reached."""
    vms, records = fleet(stages_of)
    vms += [vm(20 + n, agent=AgentState.STARTING) for n in range(unrecorded)]
    des = desired(workers=WANTED + extra_workers)
    added = len(launches(run(observed(vms, records), des)))
    live = len(vms) + added
    assert live <= max(des.workers, len(vms)) + MIN_PEERS_PER_STAGE * STAGES
    missing = sum(max(0, MIN_PEERS_PER_STAGE - stages_of.count(stage)) for stage in range(STAGES))
    on_the_way = unrecorded + added
    assert on_the_way >= missing or live >= des.workers + MIN_PEERS_PER_STAGE * STAGES


def test_a_surplus_extra_is_retired_from_the_least_loaded_stage_once_every_stage_has_two():
    vms, records = fleet([0, 0, 0, 1, 1, 2])
    extra = vm(7, reason=LaunchReason.STAGE_PEERS)
    records = [*records, rec(7, 2)]  # the extra joined stage 2: 3/2/2 on 8 VMs, 7 wanted
    (retire,) = [a for a in run(observed(vms + [extra], records)) if isinstance(a, Terminate)]
    assert retire.reason is EndReason.SURPLUS_STAGE_PEER and retire.instance_id == "i-3"  # stage 0's newest
    assert launches(run(observed(vms + [extra], records))) == []


def test_a_surplus_extra_is_retired_where_its_stage_keeps_its_region():
    vms, records = fleet([0, 0, 0, 1, 1, 2])
    extra = vm(7, reason=LaunchReason.STAGE_PEERS)
    regions = ["A", "A", "B", "A", "B", "A", "B"]  # stage 0: A A B, stage 1: A B, stage 2: A B
    placed = [dataclasses.replace(r, domain=region) for r, region in zip([*records, rec(7, 2)], regions)]
    (retire,) = [a for a in run(observed(vms + [extra], placed)) if isinstance(a, Terminate)]
    assert retire.instance_id == "i-2"  # stage 0's newest in A; i-3 was its only peer in B


def test_nothing_is_retired_while_a_stage_would_fall_under_two_or_without_extras():
    vms, records = fleet([0, 0, 1, 1, 2, 2])
    extra = vm(7, reason=LaunchReason.STAGE_PEERS)
    balanced = [*records, rec(7, 2, AgentState.STARTING)]  # 2/2/3, the third still starting
    assert not [a for a in run(observed(vms + [extra], balanced)) if isinstance(a, Terminate)]
    migrated = vm(7, reason=LaunchReason.MIGRATION)  # the policy's make-before-break: its own to retire
    assert not [a for a in run(observed(vms + [migrated], [*records, rec(7, 2)])) if isinstance(a, Terminate)]


def test_data_parallelism_ignores_stage_records():
    vms, records = fleet([0, 0, 0, 1, 1, 2])
    des = Desired(cluster="c", workers=WANTED, backups=0, offers=(OFFER,), guard=RICH, checkpoint_replicas=1,
                  initial_fleet_launched=True)
    assert launches(run(observed(vms, records), des)) == []
