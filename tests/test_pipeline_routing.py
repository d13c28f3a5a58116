"""The trainer's choice of a stage peer (pure): busy time over throughput, bans, bounded calls."""

from __future__ import annotations

import collections

import pytest

from spotrain.agents.pipeline.routing import (
    PeerHealth,
    PeerLoad,
    RouteTable,
    RoutingPolicy,
    after_failure,
    choose_peer,
    expected_finish,
    saturated,
)

POLICY = RoutingPolicy(max_in_flight=4, ban_seconds=1.0, max_ban_seconds=8.0)


def test_the_peer_that_would_finish_first_is_chosen():
    fast_busy = PeerLoad("fast", samples_per_second=30.0, queued=2)  # 3 / 30 = 0.1
    slow_idle = PeerLoad("slow", samples_per_second=5.0, queued=0)  # 1 / 5 = 0.2
    assert choose_peer([slow_idle, fast_busy], {}, 0.0, POLICY) == "fast"
    fast_busier = PeerLoad("fast", samples_per_second=30.0, queued=6)  # 7 / 30 > 0.2
    assert choose_peer([slow_idle, fast_busier], {}, 0.0, POLICY) == "slow"


def test_an_unmeasured_peer_is_assumed_as_fast_as_its_stage():
    loads = [PeerLoad("a", 10.0, 1), PeerLoad("b", 30.0, 3), PeerLoad("new", 0.0, 0)]
    assert expected_finish(loads[2], 20.0) == pytest.approx(0.05)
    assert choose_peer(loads, {}, 0.0, POLICY) == "new"
    assert choose_peer([PeerLoad("x", 0.0, 1), PeerLoad("y", 0.0, 0)], {}, 0.0, POLICY) == "y"


def test_ties_go_to_the_same_peer_whatever_the_order():
    loads = [PeerLoad("b", 10.0, 0), PeerLoad("a", 10.0, 0)]
    assert choose_peer(loads, {}, 0.0, POLICY) == choose_peer(loads[::-1], {}, 0.0, POLICY) == "a"


def test_banned_excluded_and_full_peers_are_skipped_and_none_is_said_when_nothing_is_left():
    loads = [PeerLoad("a", 50.0, 0), PeerLoad("b", 10.0, 0), PeerLoad("c", 10.0, 9, in_flight=4)]
    banned = {"a": PeerHealth(failures=1, banned_until=5.0)}
    assert choose_peer(loads, banned, 4.9, POLICY) == "b"
    assert choose_peer(loads, banned, 5.0, POLICY) == "a"  # the ban is over
    assert choose_peer(loads, banned, 4.9, POLICY, exclude={"b"}) is None


def test_a_backward_goes_back_to_its_forward_peer_while_it_is_usable():
    loads = [PeerLoad("a", 10.0, 3, in_flight=3), PeerLoad("b", 10.0, 0)]
    assert choose_peer(loads, {}, 0.0, POLICY) == "b"
    assert choose_peer(loads, {}, 0.0, POLICY, prefer="a") == "a"
    assert choose_peer(loads, {"a": PeerHealth(1, 9.0)}, 0.0, POLICY, prefer="a") == "b"
    assert choose_peer(loads, {}, 0.0, POLICY, exclude={"a"}, prefer="a") == "b"
    assert choose_peer(loads, {}, 0.0, POLICY, prefer="gone") == "b"


def test_bans_double_with_each_failure_in_a_row_up_to_the_cap():
    health, bans = PeerHealth(), []
    for now in range(6):
        health = after_failure(health, float(now), POLICY)
        bans.append(health.banned_until - now)
    assert bans == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0] and health.failures == 6


def test_route_table_spreads_work_by_throughput_and_bounds_calls_per_peer():
    table = RouteTable(POLICY)
    table.succeeded(0, "fast", 30.0, 0, now=0.0)
    table.succeeded(0, "slow", 10.0, 0, now=0.0)
    picks = collections.Counter()
    for _ in range(8):  # nothing returns: each pick raises that peer's queue
        peer = table.choose(0, ["fast", "slow"], 0.0)
        assert peer is not None
        table.sent(0, peer)
        picks[peer] += 1
    assert picks == {"fast": 4, "slow": 4}  # fast would take more but holds at most 4 of ours
    assert table.choose(0, ["fast", "slow"], 0.0) is None
    table.succeeded(0, "fast", 30.0, 3, now=0.0)
    assert table.load(0, "fast", 0.0) == PeerLoad("fast", 30.0, queued=3, in_flight=3)
    assert table.choose(0, ["fast", "slow"], 0.0) == "fast"


def test_route_table_bans_a_failed_peer_until_a_success_clears_it():
    table = RouteTable(POLICY)
    table.sent(0, "a")
    table.failed(0, "a", now=10.0)
    assert table.in_flight[0, "a"] == 0
    assert table.choose(0, ["a", "b"], 10.5) == "b"
    assert table.choose(0, ["a"], 11.0) == "a"
    table.sent(0, "a")
    table.failed(0, "a", now=11.0)
    assert table.choose(0, ["a"], 12.5) is None  # banned twice as long
    table.sent(0, "a")
    table.succeeded(0, "a", 5.0, 0, now=12.5)
    assert table.health == {} and table.choose(0, ["a"], 12.5) == "a"


def test_a_reported_queue_counts_only_while_fresh():
    """A peer that reported a long queue and was never sent to again would never report a shorter one."""
    table = RouteTable(POLICY)
    table.succeeded(0, "was_busy", 10.0, 6, now=0.0)
    table.succeeded(0, "other", 10.0, 2, now=0.0)
    assert table.choose(0, ["was_busy", "other"], POLICY.report_seconds) == "other"
    assert table.load(0, "was_busy", POLICY.report_seconds + 0.1) == PeerLoad("was_busy", 10.0, queued=0)
    table.succeeded(0, "other", 10.0, 2, now=POLICY.report_seconds + 0.1)
    assert table.choose(0, ["was_busy", "other"], POLICY.report_seconds + 0.1) == "was_busy"


def test_a_peer_that_moved_starts_fresh_on_its_new_stage():
    """Same peer id, other stage: neither its old stage's ban, queue and speed nor its calls there count."""
    table = RouteTable(POLICY)
    table.succeeded(0, "mover", 2.0, 4, now=0.0)  # slow and busy on stage 0
    table.sent(0, "mover")
    table.failed(0, "mover", now=1.0)  # refused as it left stage 0
    table.succeeded(1, "mate", 10.0, 1, now=1.0)
    assert table.load(1, "mover", 1.0) == PeerLoad("mover", 0.0, queued=0)
    assert table.choose(1, ["mate", "mover"], 1.0) == "mover"  # unmeasured: as fast as its stage, idle
    assert table.choose(0, ["mover"], 1.0) is None  # still banned where it failed


def test_an_invalid_policy_is_refused():
    with pytest.raises(ValueError):
        RoutingPolicy(max_in_flight=0)
    with pytest.raises(ValueError):
        RoutingPolicy(ban_seconds=10.0, max_ban_seconds=1.0)
    with pytest.raises(ValueError):
        RoutingPolicy(report_seconds=-1.0)


def test_a_stage_whose_live_peers_are_all_full_is_saturated_not_failing():
    full, also_full = PeerLoad("a", 10.0, 4, in_flight=4), PeerLoad("b", 10.0, 5, in_flight=4)
    banned = {"b": PeerHealth(failures=1, banned_until=5.0)}
    assert saturated([full, also_full], {}, 0.0, POLICY)  # wait for a slot, however long
    assert saturated([full, also_full], banned, 0.0, POLICY)  # the live one is full
    assert not saturated([full, PeerLoad("b", 10.0, 0, in_flight=1)], {}, 0.0, POLICY)  # a slot is free
    assert not saturated([PeerLoad("a", 10.0, 0)], {"a": PeerHealth(1, 5.0)}, 0.0, POLICY)  # all banned
    assert not saturated([], {}, 0.0, POLICY)  # no peer at all: that is a failure to wait out
    table = RouteTable(POLICY)
    for _ in range(4):
        table.sent(0, "a")
    assert table.saturated(0, ["a"], 0.0) and not table.saturated(1, ["a"], 0.0)
