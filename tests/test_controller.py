"""reconcile() is pure: plain values in, actions out."""

from spotrain.budget import BudgetGuard
from spotrain.contracts.states import EndReason
from spotrain.controller import (
    AssignDuty,
    Desired,
    EndRun,
    Launch,
    Observed,
    ObservedInstance,
    Terminate,
    reconcile,
)
from spotrain.policies.spread import SpreadCheapest
from spotrain.providers.base import Offer

A = Offer("local", "local:zone-a", "local.cpu", None, 0.92)
B = Offer("local", "local:zone-b", "local.cpu", None, 0.19)
GUARD = BudgetGuard(total_usd=10.0, tick_seconds=2.0, termination_lag_seconds=13.0)


def desired(**overrides) -> Desired:
    values = dict(cluster="c", workers=3, backups=1, offers=(A, B), guard=GUARD, checkpoint_replicas=2,
                  initial_fleet_launched=True)
    values.update(overrides)
    return Desired(**values)


def inst(n: int, location: str, state: str = "running", agent: str | None = "training", price: float = 0.5):
    return ObservedInstance(f"c-r{n:05d}", f"i-{n}", location, price, state, agent)


def observed(*instances, spent=0.0, epoch=0, launches=None, duty=()) -> Observed:
    return Observed(instances=tuple(instances), spent_usd=spent, global_epoch=epoch,
                    launches=len(instances) if launches is None else launches, duty=duty)


def run(obs, des, now=0.0):
    return reconcile(obs, des, now, SpreadCheapest())


def test_initial_fleet_is_spread_over_locations_cheapest_first():
    actions = run(observed(), desired(initial_fleet_launched=False))
    launches = [a for a in actions if isinstance(a, Launch)]
    assert [a.offer.location for a in launches] == ["local:zone-b", "local:zone-a", "local:zone-b", "local:zone-a"]
    assert [a.request_id for a in launches] == ["c-r00000", "c-r00001", "c-r00002", "c-r00003"]
    assert {a.reason for a in launches} == {"initial"}


def test_a_preempted_worker_is_replaced_with_a_fresh_request_id():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-b"), inst(2, "local:zone-a")]
    actions = run(observed(*fleet, inst(3, "local:zone-b", state="preempted"), launches=4), desired())
    (launch,) = [a for a in actions if isinstance(a, Launch)]
    assert launch.offer.location == "local:zone-b" and launch.request_id == "c-r00004"
    assert launch.reason == "replacement"


def test_a_draining_worker_is_replaced_before_it_is_gone():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-b"), inst(2, "local:zone-a"),
             inst(3, "local:zone-b", agent="draining")]
    assert len([a for a in run(observed(*fleet), desired()) if isinstance(a, Launch)]) == 1


def test_pending_requests_count_toward_the_fleet():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-b", state="requested", agent=None)]
    launches = [a for a in run(observed(*fleet), desired(workers=2, backups=0)) if isinstance(a, Launch)]
    assert launches == []


def test_duty_goes_to_distinct_locations_and_moves_when_a_holder_goes():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-a"), inst(2, "local:zone-b"), inst(3, "local:zone-b")]
    (duty,) = [a for a in run(observed(*fleet), desired()) if isinstance(a, AssignDuty)]
    assert duty.instance_ids == ("i-0", "i-2")
    survivors = [fleet[1], fleet[2], fleet[3]]  # i-0 was preempted
    (duty,) = [a for a in run(observed(*survivors, duty=("i-0", "i-2")), desired()) if isinstance(a, AssignDuty)]
    assert duty.instance_ids == ("i-2", "i-1")


def test_duty_skips_workers_that_are_not_training_yet():
    fleet = [inst(0, "local:zone-a", agent=None), inst(1, "local:zone-b", agent="starting")]
    assert not [a for a in run(observed(*fleet), desired(workers=2, backups=0)) if isinstance(a, AssignDuty)]


def test_end_conditions_terminate_everything():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-b")]
    for obs, des, now, reason in [
        (observed(*fleet), desired(end_at=100.0), 100.0, "duration reached"),
        (observed(*fleet, epoch=7), desired(target_epoch=7), 0.0, "reached target epoch 7"),
        (observed(*fleet), desired(stop_requested=True), 0.0, "stopped by user"),
        (observed(*fleet, spent=9.9999), desired(), 0.0, "budget nearly spent"),
    ]:
        actions = run(obs, des, now)
        assert actions[0] == EndRun(reason)
        assert {a.instance_id for a in actions[1:] if isinstance(a, Terminate)} == {"i-0", "i-1"}
        assert {a.reason for a in actions[1:] if isinstance(a, Terminate)} == {EndReason.RUN_ENDED}
        assert not [a for a in actions if isinstance(a, Launch)]


class _RetiresZoneA(SpreadCheapest):
    def retire(self, ctx):
        return [m.request_id for m in ctx.fleet if m.location == "local:zone-a"]


def test_a_retired_worker_is_terminated_for_that_reason():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-b")]
    actions = reconcile(observed(*fleet), desired(workers=2, backups=0), 0.0, _RetiresZoneA())
    assert [a for a in actions if isinstance(a, Terminate)] == [Terminate("c-r00000", "i-0", EndReason.RETIRED)]


def test_no_launch_the_money_left_cannot_pay():
    guard = BudgetGuard(total_usd=0.01, tick_seconds=2.0, termination_lag_seconds=13.0)
    # one worker at $0.5/h leaves room for nothing costing $0.92/h over ten more ticks
    fleet = [inst(0, "local:zone-b", price=0.5)]
    launches = [a for a in run(observed(*fleet, spent=0.0), desired(guard=guard, offers=(A,)))
                if isinstance(a, Launch)]
    assert launches == []


def test_max_hourly_caps_the_fleet():
    guard = BudgetGuard(total_usd=100.0, tick_seconds=2.0, termination_lag_seconds=13.0, max_hourly_usd=1.0)
    launches = [a for a in run(observed(), desired(guard=guard, initial_fleet_launched=False))
                if isinstance(a, Launch)]
    assert sum(a.offer.spot_usd_per_hour for a in launches) <= 1.0
    # zone-a's $0.92/h beside any zone-b worker would pass $1/h: all four go to zone-b
    assert [a.offer.location for a in launches] == ["local:zone-b"] * 4


class _MovesToB(SpreadCheapest):
    def migrate(self, offers, ctx):
        return [B] if all(m.training for m in ctx.fleet) else []


def test_a_settled_fleet_may_launch_a_migration_beyond_its_size():
    fleet = [inst(0, "local:zone-a"), inst(1, "local:zone-a")]
    actions = reconcile(observed(*fleet), desired(workers=2, backups=0), 0.0, _MovesToB())
    (launch,) = [a for a in actions if isinstance(a, Launch)]
    assert launch.reason == "migration" and launch.offer is B and launch.request_id == "c-r00002"
    starting = [inst(0, "local:zone-a"), inst(1, "local:zone-a", agent="starting")]
    actions = reconcile(observed(*starting), desired(workers=2, backups=0), 0.0, _MovesToB())
    assert not [a for a in actions if isinstance(a, Launch)]
