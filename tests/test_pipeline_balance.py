"""Stage rebalancing (pure): properties over random swarms, and the cases that name the rules."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotrain.agents.pipeline.balance import (
    MIN_PEERS_PER_STAGE,
    PETALS_MIN_GAIN,
    Move,
    best_move,
    pipeline_throughput,
    rebalance_delay,
    should_move,
    stage_for_newcomer,
    stage_throughputs,
)
from spotrain.contracts.stage_records import StageRecord, latest_records
from spotrain.contracts.states import AgentState

NOW = 1000.0


def record(stage: int, peer: str, speed: float, state: AgentState = AgentState.TRAINING,
           time: float = NOW) -> StageRecord:
    return StageRecord(stage=stage, peer_id=peer, instance_id=f"i-{peer}", samples_per_second=speed, queue=0,
                       state=state, time=time)


@st.composite
def swarms(draw: st.DrawFn) -> tuple[list[StageRecord], int, list[float]]:
    stages = draw(st.integers(2, 5))
    states = st.sampled_from([AgentState.TRAINING] * 4 + [AgentState.STARTING, AgentState.DRAINING])
    records = []
    for stage in range(stages):
        for index in range(draw(st.integers(0, 6))):
            records.append(record(stage, f"p{stage}-{index}", draw(st.floats(0.1, 100.0)), draw(states)))
    costs = draw(st.lists(st.floats(0.25, 4.0), min_size=stages, max_size=stages))
    return records, stages, costs


def apply(records: list[StageRecord], move: Move, costs: list[float]) -> list[StageRecord]:
    """The records after a move, the peer's speed predicted by the stage costs as balance does."""
    moved = []
    for r in records:
        if r.peer_id == move.peer_id:
            speed = r.samples_per_second * costs[move.source] / costs[move.target]
            r = dataclasses.replace(r, stage=move.target, samples_per_second=speed)
        moved.append(r)
    return moved


def training_peers(records: list[StageRecord], stage: int) -> int:
    return sum(1 for r in records if r.stage == stage and r.state == AgentState.TRAINING)


@settings(max_examples=400, deadline=None)
@given(swarms(), st.floats(1.0, 2.0))
def test_a_move_gains_at_least_min_gain_and_keeps_two_peers_on_its_stage(swarm, min_gain):
    records, stages, costs = swarm
    move = best_move(records, stages, min_gain=min_gain, stage_costs=costs)
    if move is None:
        return
    after = apply(records, move, costs)
    assert move.throughput_before == pipeline_throughput(records, stages)
    assert move.throughput_after == pytest.approx(pipeline_throughput(after, stages))
    assert move.throughput_after > move.throughput_before
    assert move.throughput_after >= move.throughput_before * min_gain
    assert training_peers(after, move.source) >= MIN_PEERS_PER_STAGE
    mover = next(r for r in records if r.peer_id == move.peer_id)
    assert mover.state == AgentState.TRAINING and mover.stage == move.source != move.target


@settings(max_examples=200, deadline=None)
@given(swarms(), st.randoms(use_true_random=False))
def test_every_peer_reading_the_same_records_agrees_on_one_mover(swarm, rng):
    records, stages, costs = swarm
    shuffled = list(records)
    rng.shuffle(shuffled)
    move = best_move(records, stages, stage_costs=costs)
    assert best_move(shuffled, stages, stage_costs=costs) == move
    movers = [r.peer_id for r in records if should_move(shuffled, stages, r.peer_id, stage_costs=costs)]
    assert movers == ([move.peer_id] if move else [])


@settings(max_examples=200, deadline=None)
@given(swarms())
def test_repeated_rebalancing_settles(swarm):
    records, stages, costs = swarm
    for _ in range(64):  # each move multiplies the throughput by at least 4/3: few can follow
        move = best_move(records, stages, stage_costs=costs)
        if move is None:
            return
        records = apply(records, move, costs)
    raise AssertionError("rebalancing did not settle")


@settings(max_examples=300, deadline=None)
@given(swarms(), st.floats(0.1, 100.0))
def test_a_newcomer_fills_a_stage_under_two_peers_else_raises_the_throughput_most(swarm, speed):
    records, stages, _ = swarm
    chosen = stage_for_newcomer(records, stages)
    totals = stage_throughputs(records, stages)
    peers = [sum(1 for r in records if r.stage == stage and r.state != AgentState.DRAINING)
             for stage in range(stages)]
    short = [stage for stage in range(stages) if peers[stage] < MIN_PEERS_PER_STAGE]
    if short:  # redundancy first: the slowest of the stages one preemption away from stopping
        assert chosen in short and totals[chosen] == min(totals[stage] for stage in short)
        return
    def with_newcomer(stage: int) -> float:
        return pipeline_throughput([*records, record(stage, "new", speed)], stages)
    assert all(with_newcomer(chosen) >= with_newcomer(stage) for stage in range(stages))
    assert totals[chosen] == min(totals)


def test_a_newcomer_joins_a_stage_with_one_peer_before_a_slower_stage_with_two():
    # stage 1's one fast peer out-serves stage 0's two slow ones, but one preemption stops the pipeline
    records = [record(0, "a0", 2.0), record(0, "a1", 2.0), record(1, "b0", 10.0)]
    assert stage_for_newcomer(records, 2) == 1
    assert stage_for_newcomer([*records, record(1, "b1", 10.0)], 2) == 0


def test_a_peer_of_the_least_loaded_stage_moves_to_the_slowest():
    records = [record(0, f"a{i}", 10.0) for i in range(4)] + [record(1, f"b{i}", 10.0) for i in range(2)]
    move = best_move(records, 2)
    assert move == Move(peer_id="a0", source=0, target=1, throughput_before=20.0, throughput_after=30.0)
    assert should_move(records, 2, "a0") == move and should_move(records, 2, "a1") is None


def test_no_move_below_the_gain_threshold():
    # moving one 5/s peer lifts the slowest stage from 20 to 25: x1.25, under Petals' x1.33
    records = [record(0, f"a{i}", 5.0) for i in range(6)] + [record(1, "b0", 10.0), record(1, "b1", 10.0)]
    assert best_move(records, 2) is None
    assert best_move(records, 2, min_gain=1.2) is not None
    assert PETALS_MIN_GAIN == pytest.approx(1 / 0.75)


def test_a_stage_never_loses_its_second_to_last_serving_peer():
    records = [record(0, "a0", 100.0), record(0, "a1", 100.0), record(1, "b0", 1.0), record(1, "b1", 1.0)]
    assert best_move(records, 2) is None
    starting = [*records, record(0, "a2", 100.0, AgentState.STARTING)]  # not serving yet: cannot stand in
    assert best_move(starting, 2) is None
    assert best_move([*records, record(0, "a2", 100.0)], 2) is not None


def test_draining_peers_count_for_nothing_and_an_empty_stage_is_filled_first():
    records = [record(0, f"a{i}", 5.0) for i in range(3)] + [record(1, "b0", 5.0, AgentState.DRAINING)]
    assert stage_throughputs(records, 2) == [15.0, 0.0]
    assert stage_for_newcomer(records, 2) == 1
    move = best_move(records, 2)
    assert move is not None and move.target == 1 and move.throughput_before == 0.0


def test_stage_costs_predict_a_peer_on_another_stage():
    # the tail costs twice the head per sample: a head peer serves half as many samples there
    records = [record(0, f"a{i}", 20.0) for i in range(4)] + [record(1, f"b{i}", 5.0) for i in range(2)]
    move = best_move(records, 2, stage_costs=[1.0, 2.0])
    assert move is not None and move.throughput_after == pytest.approx(20.0)
    with pytest.raises(ValueError, match="positive stage costs"):
        best_move(records, 2, stage_costs=[1.0])


def test_rebalance_delay_spreads_the_period_by_the_callers_draw():
    assert rebalance_delay(60.0, 0.25, 0.0) == 45.0
    assert rebalance_delay(60.0, 0.25, 0.5) == 60.0
    delays = [rebalance_delay(60.0, 0.25, random.Random(seed).random()) for seed in range(200)]
    assert 45.0 <= min(delays) < 50.0 and 70.0 < max(delays) < 75.0
    with pytest.raises(ValueError):
        rebalance_delay(60.0, 1.5, 0.5)


def test_latest_records_keep_each_peers_newest_unexpired_one():
    old, new = record(0, "a", 1.0, time=NOW - 5), record(1, "a", 2.0, time=NOW - 1)
    stale = record(0, "b", 1.0, time=NOW - 31)
    assert latest_records([new, stale, old], NOW) == [new]


def test_stage_records_round_trip_and_malformed_ones_are_refused():
    original = record(2, "p", 3.5, AgentState.DRAINING)
    data = original.to_record()
    assert data["state"] == "draining" and StageRecord.from_record(data) == original
    for bad in (None, [], {**data, "state": "bogus"}, {**data, "samples_per_second": float("nan")},
                {**data, "queue": -1}, {k: v for k, v in data.items() if k != "stage"},
                {**data, "domain": 7}, {**data, "domain": "x" * 129}):
        assert StageRecord.from_record(bad) is None
    placed = dataclasses.replace(original, domain="local:us-east")
    assert StageRecord.from_record(placed.to_record()) == placed
    # a record of an older peer names no domain: an unknown one
    assert StageRecord.from_record({k: v for k, v in data.items() if k != "domain"}) == original


def test_an_unmeasured_peer_counts_as_fast_as_its_stage_and_nothing_moves_before_a_measurement():
    # the trainer's first microbatches measured two tail peers; the head's peers are not measured yet
    first = [record(0, f"a{i}", 0.0) for i in range(4)] + [record(1, "b0", 40.0), record(1, "b1", 30.0)] + \
        [record(1, f"b{i}", 0.0) for i in range(2, 4)]
    assert best_move(first, 2) is None  # 4/4, each unmeasured peer at the median 35/s: balanced
    assert best_move([record(0, "a0", 0.0), record(0, "a1", 0.0), record(1, "b0", 0.0)], 2) is None
    # a stage with none measured counts its peers at every measured peer's median
    records = [record(0, f"a{i}", 0.0) for i in range(2)] + [record(1, f"b{i}", 10.0) for i in range(4)]
    move = best_move(records, 2)
    assert move is not None and (move.source, move.target, move.throughput_before) == (1, 0, 20.0)


def test_a_move_keeps_each_stage_in_the_regions_it_spans_when_another_mover_gains_enough():
    def placed(stage: int, peer: str, speed: float, domain: str) -> StageRecord:
        return dataclasses.replace(record(stage, peer, speed), domain=domain)

    # stage 1 has three peers, its only us-east peer the slowest; stage 0 limits the pipeline
    records = [placed(0, "a0", 10.0, "eu"), placed(0, "a1", 10.0, "us"),
               placed(1, "b0", 20.0, "eu"), placed(1, "b1", 20.0, "eu"), placed(1, "b2", 15.0, "us")]
    move = best_move(records, 2)
    # without regions the slower b2 would move (it predicts more: 35 vs 35 ties, then the slower
    # peer); with them an eu peer moves and stage 1 keeps its us-east peer
    assert move is not None and move.peer_id in {"b0", "b1"} and (move.source, move.target) == (1, 0)
    unplaced = [dataclasses.replace(r, domain="") for r in records]
    assert best_move(unplaced, 2) is not None and best_move(unplaced, 2).peer_id == "b2"
    # every mover strips a region from its stage: the move still happens (throughput comes first)
    records = [placed(0, "a0", 10.0, "eu"), placed(0, "a1", 10.0, "us"),
               placed(1, "b0", 20.0, "eu"), placed(1, "b1", 20.0, "us"), placed(1, "b2", 15.0, "ap")]
    move = best_move(records, 2)
    assert move is not None and move.peer_id == "b2"


def test_a_lost_serving_peer_brings_the_next_move_check_forward_and_nothing_else_does():
    from spotrain.agents.pipeline.balance import LOSS_SETTLE_SECONDS, next_check_after_loss

    now, periodic = 100.0, 118.0
    # a peer gone (killed: its record lapsed; or draining on a notice): check within the settle time
    early = next_check_after_loss(periodic, now, {"a", "b", "c"}, {"a", "c"}, 0.5)
    assert early == pytest.approx(now + LOSS_SETTLE_SECONDS)
    assert now < next_check_after_loss(periodic, now, {"a", "b"}, {"a"}, 0.99) < periodic
    # a newcomer, or nothing changed: the periodic check stands
    assert next_check_after_loss(periodic, now, {"a"}, {"a", "b"}, 0.5) == periodic
    assert next_check_after_loss(periodic, now, {"a", "b"}, {"a", "b"}, 0.5) == periodic
    # a check already due sooner is not pushed back
    assert next_check_after_loss(now + 1, now, {"a", "b"}, {"a"}, 0.5) == now + 1


def test_after_a_loss_a_peer_checks_at_every_refresh_for_one_period_then_periodically_again():
    from spotrain.agents.pipeline.balance import LOSS_SETTLE_SECONDS, MoveChecks

    checks = MoveChecks.from_now(20.0, 0.0, 0.5)  # first periodic check at 20 s
    every = {"a", "b", "c"}
    assert [checks.due(t, every, every, 0.5) for t in (2.0, 4.0, 18.0)] == [False, False, False]
    assert checks.due(20.0, every, every, 0.5) and checks.next_check == 40.0  # periodic: the next scheduled
    assert not checks.due(22.0, every, every, 0.5)
    lost_at = 24.0  # "b" left the fresh records
    assert not checks.due(lost_at, every, {"a", "c"}, 0.5)  # the survivors' speeds settle first
    first = lost_at + LOSS_SETTLE_SECONDS
    refreshes = [first + 2.0 * i for i in range(10)]  # one period of refreshes every 2 s
    assert all(checks.due(t, {"a", "c"}, {"a", "c"}, 0.5) for t in refreshes)
    after = first + 20.0
    assert checks.due(after, {"a", "c"}, {"a", "c"}, 0.5)  # the eager window ended: one periodic check
    assert not checks.due(after + 2.0, {"a", "c"}, {"a", "c"}, 0.5) and checks.next_check == after + 20.0


def test_a_peer_that_moved_stays_for_some_periods_unless_a_peer_is_lost():
    from spotrain.agents.pipeline.balance import MOVE_HOLD_PERIODS, MoveChecks, may_move_again

    period, moved_at = 20.0, 100.0
    hold_ends = moved_at + MOVE_HOLD_PERIODS * period
    assert may_move_again(None, 0.0, period, after_loss=False)  # never moved
    assert not may_move_again(moved_at, moved_at + 66.0, period, after_loss=False)  # noisy speeds turned
    assert may_move_again(moved_at, hold_ends, period, after_loss=False)
    assert may_move_again(moved_at, moved_at + 1.0, period, after_loss=True)  # refilling a stage comes first

    checks = MoveChecks.from_now(period, 0.0, 0.5)
    every = {"a", "b", "c"}
    assert not checks.after_loss(10.0)
    checks.due(10.0, every, {"a", "c"}, 0.5)  # "b" lost: eager checks for a period from a few seconds on
    assert checks.after_loss(10.0) and checks.after_loss(checks.next_check + period - 0.1)
    assert not checks.after_loss(checks.next_check + period)


def test_of_two_peers_announcing_a_move_to_one_stage_at_once_the_lower_peer_id_goes():
    from spotrain.agents.pipeline.balance import concurrent_movers

    decided_on = [record(0, "a", 10.0), record(0, "joiner", 0.0, AgentState.STARTING),
                  record(1, "p", 10.0), record(1, "q", 10.0), record(1, "r", 10.0)]
    # read a refresh after "q" and "r" both announced a move to stage 0 (and "p" one to stage 2)
    now = [record(0, "a", 10.0), record(0, "joiner", 0.0, AgentState.STARTING), record(1, "s", 10.0),
           record(2, "p", 10.0, AgentState.STARTING), record(0, "q", 10.0, AgentState.STARTING),
           record(0, "r", 10.0, AgentState.STARTING)]
    assert concurrent_movers(decided_on, now, "q", 0) == []  # "q" goes
    assert concurrent_movers(decided_on, now, "r", 0) == ["q"]  # "r" stays
    # a `starting` record the move was decided on ("joiner") was counted already; another stage's is no rival
    assert concurrent_movers(decided_on, now, "z", 0) == ["q", "r"]
