import subprocess
import sys
from dataclasses import replace

import pytest

from spotrain.policies import FleetMember, PlacementContext, PlacementPolicy, get_policy, policy_names
from spotrain.policies.base import POLICY_MODULES
from spotrain.policies.baselines import EagerNextRegion, OnDemandOneRegion, UniformProgress
from spotrain.policies.cost_per_sample import CostPerSamplePlanner
from spotrain.providers.base import Offer
from spotrain.throughput import TaskProfile


def offer(location, price, gpu="V100", market="spot"):
    return Offer(location.split(":")[0], location, "t", gpu, price, market=market)


OFFERS = [offer("aws:us-east-1a", 0.9), offer("aws:us-east-1b", 0.9), offer("aws:us-west-2a", 0.8),
          offer("aws:us-east-1a", 3.06, market="on-demand"), offer("aws:eu-west-1a", 0.5)]


def place(policy, ctx, n):
    chosen = []
    for i in range(n):
        o = policy.choose(OFFERS, ctx)
        chosen.append(o)
        ctx = replace(ctx, fleet=ctx.fleet + (FleetMember(str(i), o.location, o.spot_usd_per_hour, o.gpu),))
    return chosen


def test_registry():
    assert set(policy_names()) >= {"spotrain", "on-demand", "uniform-progress", "eager-next-region"}
    for name in policy_names():  # each name's module registers a class of that name
        policy = get_policy(name)
        assert type(policy).__module__ == POLICY_MODULES[name], name


def test_a_spec_policy_is_checked_without_importing_any_policy():
    probe = ("import sys, spotrain.config\n"
             "from spotrain.config import Placement\n"
             "Placement(policy='eager-next-region')\n"
             "print(sorted(m for m in sys.modules if m.startswith('spotrain.policies')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['spotrain.policies', 'spotrain.policies.base']"


def test_a_policy_named_outside_the_table_is_refused():
    with pytest.raises(ValueError, match="'made-up' of .* is not in POLICY_MODULES"):
        type("MadeUp", (PlacementPolicy,), {"choose": lambda self, offers, ctx: None}, name="made-up")


def test_single_worker_takes_the_cheapest_spot_per_sample():
    (o,) = place(CostPerSamplePlanner(), PlacementContext(now=0, workers=1), 1)
    assert o.location == "aws:eu-west-1a"


def test_workers_stay_close_when_communication_dominates():
    profile = TaskProfile(model_bytes=4e9, compression_ratio=1.0)  # a big model: WAN links hurt
    chosen = place(CostPerSamplePlanner(profile), PlacementContext(now=0, workers=3), 3)
    assert len({o.location.split(":")[1][:7] for o in chosen}) == 1  # one region


def test_backups_go_to_other_failure_domains():
    chosen = place(CostPerSamplePlanner(), PlacementContext(now=0, workers=1), 2)
    assert chosen[0].location == "aws:eu-west-1a"
    assert chosen[1].location != "aws:eu-west-1a" and not chosen[1].location.startswith("aws:eu-west-1")


def test_preemptions_and_refusals_steer_away():
    ctx = PlacementContext(now=1000, workers=1, preemptions={"aws:eu-west-1a": 40},
                           hours_observed={"aws:eu-west-1a": 2})
    assert place(CostPerSamplePlanner(), ctx, 1)[0].location != "aws:eu-west-1a"
    ctx = PlacementContext(now=1000, workers=1, failed_at={"aws:eu-west-1a": (900.0, 1)})
    assert place(CostPerSamplePlanner(), ctx, 1)[0].location != "aws:eu-west-1a"
    later = replace(ctx, now=900 + 601)
    assert place(CostPerSamplePlanner(), later, 1)[0].location == "aws:eu-west-1a"


def test_falls_back_to_on_demand_when_spot_cannot_meet_the_deadline():
    rate = TaskProfile().rate("V100")
    tight = PlacementContext(now=0, workers=1, target_samples=rate * 3600 * 10, deadline=10 * 3600, samples_done=0)
    assert CostPerSamplePlanner().choose(OFFERS, tight).market == "on-demand"
    loose = replace(tight, deadline=20 * 3600)
    assert CostPerSamplePlanner().choose(OFFERS, loose).market == "spot"


def test_baselines():
    ctx = PlacementContext(now=0, workers=1, allowed=("aws:us-east-1a", "aws:us-east-1b"))
    assert OnDemandOneRegion().choose(OFFERS, ctx).market == "on-demand"
    eager = EagerNextRegion()
    assert eager.choose(OFFERS, ctx).location == "aws:us-east-1a"
    moved = replace(ctx, preemptions={"aws:us-east-1a": 1},
                    fleet=(FleetMember("r1", "aws:us-east-1a", 0.9),))
    assert eager.retire(moved) == ["r1"] and eager.choose(OFFERS, moved).location == "aws:us-east-1b"
    uniform = UniformProgress()
    ahead = replace(ctx, target_samples=100.0, deadline=100.0, samples_done=0)
    assert uniform.choose(OFFERS, ahead).market == "spot"
    behind = replace(ahead, now=50.0, samples_done=10.0)
    assert uniform.choose(OFFERS, behind).market == "on-demand"


def test_unknown_policy_names_the_valid_ones():
    try:
        get_policy("nope")
    except ValueError as error:
        assert "valid:" in str(error) and "spotrain" in str(error)
    else:
        raise AssertionError("no error")


def test_planning_over_ten_thousand_offers_places_every_worker():
    offers = [offer(f"aws:us-east-1{'abcdf'[i % 5]}", 0.5 + (i % 97) / 100) for i in range(10_000)]
    policy, ctx = CostPerSamplePlanner(), PlacementContext(now=0, workers=8)
    for i in range(10):
        o = policy.choose(offers, ctx)
        assert o is not None
        ctx = replace(ctx, fleet=ctx.fleet + (FleetMember(str(i), o.location, o.spot_usd_per_hour, o.gpu),))
    assert len(ctx.fleet) == 10


# -- revising a placement: make before break ----------------------------------------------------
def member(n, location, price, training=True, gpu="V100"):
    return FleetMember(f"c-r{n:05d}", location, price, gpu, training=training)


def test_a_cheaper_place_is_taken_before_the_dear_worker_goes():
    offers = [offer("aws:us-east-1b", 1.30), offer("aws:us-east-1d", 1.14)]
    planner = CostPerSamplePlanner()
    ctx = PlacementContext(now=0, workers=1, fleet=(member(0, "aws:us-east-1b", 1.30),),
                           target_samples=1e7, samples_done=0.0)
    (move,) = planner.migrate(offers, ctx)
    assert move.location == "aws:us-east-1d"
    booting = replace(ctx, fleet=ctx.fleet + (member(1, "aws:us-east-1d", 1.14, training=False),))
    assert planner.migrate(offers, booting) == [] and planner.retire(booting) == []  # the old one keeps training
    trained = replace(ctx, fleet=ctx.fleet + (member(1, "aws:us-east-1d", 1.14),))
    assert planner.retire(trained) == ["c-r00000"]


def test_no_move_for_equal_prices_nor_near_the_end():
    offers = [offer("aws:us-east-1b", 1.14), offer("aws:us-east-1d", 1.14)]
    ctx = PlacementContext(now=0, workers=1, fleet=(member(0, "aws:us-east-1b", 1.14),), target_samples=1e7,
                           preemptions={"aws:us-east-1b": 5}, hours_observed={"aws:us-east-1b": 4.0})
    assert CostPerSamplePlanner().migrate(offers, ctx) == []  # preemption estimates alone never move a worker
    dear = [offer("aws:us-east-1b", 1.30), offer("aws:us-east-1d", 1.14)]
    rate = TaskProfile().rate("V100")
    almost_done = PlacementContext(now=0, workers=1, fleet=(member(0, "aws:us-east-1b", 1.30),),
                                   target_samples=1e7, samples_done=1e7 - rate * 60)
    assert CostPerSamplePlanner().migrate(dear, almost_done) == []  # the move would not pay for itself


def test_an_incomplete_fleet_moves_where_the_whole_fleet_fits():
    offers = [offer("aws:us-east-2a", 0.918), offer("aws:us-west-2c", 0.918)]
    fleet = (member(0, "aws:us-east-2a", 0.918), member(1, "aws:us-east-2a", 0.918))
    ctx = PlacementContext(now=1000, workers=4, fleet=fleet, target_samples=1e9,
                           failed_at={"aws:us-east-2a": (990.0, 1)})  # no room for more there
    moves = CostPerSamplePlanner().migrate(offers, ctx)
    assert [o.location for o in moves] == ["aws:us-west-2c"] * 4
    arrived = fleet + tuple(member(n, "aws:us-west-2c", 0.918) for n in range(2, 6))
    assert sorted(CostPerSamplePlanner().retire(replace(ctx, fleet=arrived))) == ["c-r00000", "c-r00001"]


def test_after_a_move_the_whole_fleet_in_one_zone_beats_a_partial_one_with_a_better_record():
    old = tuple(member(n, "aws:us-east-2b", 0.918) for n in range(7))
    new = tuple(member(n, "aws:us-west-2a", 0.918) for n in range(7, 15))
    ctx = PlacementContext(now=0, workers=8, fleet=old + new, hours_observed={"aws:us-east-2b": 50.0})
    assert sorted(CostPerSamplePlanner().retire(ctx)) == [m.request_id for m in old]


def test_a_far_worker_that_slows_the_fleet_is_retired():
    fleet = (member(0, "aws:us-east-2a", 0.918),) + tuple(member(n, "aws:us-west-2c", 0.918) for n in (1, 2, 3))
    assert CostPerSamplePlanner().retire(PlacementContext(now=0, workers=4, fleet=fleet)) == ["c-r00000"]
    with_backup = PlacementContext(now=0, workers=3, backups=1, fleet=fleet)
    assert CostPerSamplePlanner().retire(with_backup) == []  # a backup elsewhere is wanted


def test_with_slack_it_waits_for_the_cheaper_place():
    offers = [offer("aws:us-east-1b", 1.30), offer("aws:us-east-1d", 1.14)]
    rate = TaskProfile().rate("V100")
    ctx = PlacementContext(now=0, workers=1, target_samples=rate * 3600 * 10, deadline=40 * 3600,
                           failed_at={"aws:us-east-1d": (0.0, 1)})
    assert CostPerSamplePlanner().choose(offers, ctx) is None
    short = replace(ctx, deadline=12 * 3600)  # little slack: take the dearer place now
    assert CostPerSamplePlanner().choose(offers, short).location == "aws:us-east-1b"
