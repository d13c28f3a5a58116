"""wan_scaling's ratios against the compute limit, on made-up measurements (no agents run)."""

import argparse

from benchmarks.wan_scaling import _figures, _table


def alone(rate):
    return {"mode": "alone", "rate_mbit": None, "gradients": "-", "state": "-", "samples_per_second": rate,
            "compute_cpu_ms_per_sample": 1000 / rate}


def failed_limit():
    return {"mode": "alone", "rate_mbit": None, "gradients": "-", "state": "-", "error": "agent 0 failed (exit 1)"}


def swarm(rate):
    return {"mode": "spotrain", "rate_mbit": 50.0, "gradients": "blockwise8", "state": "blockwise8",
            "samples_per_second": rate, "eval_loss": 3.0, "compute_cpu_ms_per_sample": 1000 / rate}


ARGS = argparse.Namespace(task="t", no_delayed_updates=False, agents=2, target_batch=512, batch=8, warmup=1, epochs=4)


def ratios(points):
    rows = [row for row in _figures(points, ARGS)["points"] if row["mode"] == "spotrain"]
    return [(round(row["vs_compute_limit"], 3), round(row["vs_bracketing_limits"], 3)) for row in rows]


def test_a_steady_drift_cancels_against_the_bracketing_limits_but_not_the_fastest():
    # the machine slows by 2 samples/s per run; the swarm always reaches 0.9 of the limit of its moment
    points = [alone(20), swarm(0.9 * 19), alone(18), swarm(0.9 * 17), alone(16)]
    assert ratios(points) == [(0.855, 0.9), (0.765, 0.9)]


def test_without_a_limit_after_it_a_point_uses_the_nearest_one_and_failed_runs_are_skipped():
    points = [alone(20), swarm(18), failed_limit()]
    assert ratios(points) == [(0.9, 0.9)]
    points = [alone(20), swarm(18), failed_limit(), alone(16)]
    assert ratios(points) == [(0.9, 1.0)]


def test_the_epoch_length_is_the_target_batch_at_the_fastest_limit():
    assert _figures([alone(16), swarm(15), alone(20)], ARGS)["epoch_seconds_at_limit"] == 512 / 20
    assert _figures([failed_limit(), swarm(15)], ARGS)["epoch_seconds_at_limit"] is None
    assert "20.0 samples/s, an epoch every 25.6 s" in _table(_figures([alone(16), swarm(15), alone(20)], ARGS))


def test_the_guard_cost_pairs_each_guarded_point_with_its_unguarded_twin():
    guarded, bare = swarm(18), dict(swarm(20), poison_guard=False)
    figures = _figures([alone(20), guarded, alone(20), bare, alone(20)], ARGS)
    (pair,) = figures["guard_cost"]
    assert (pair["x_limit_with_guard"], pair["x_limit_without"], pair["with_vs_without"]) == (0.9, 1.0, 0.9)
    assert "x limit 0.900 with, 1.000 without" in _table(figures) and "with/without 0.900" in _table(figures)
    assert _figures([alone(20), swarm(18)], ARGS)["guard_cost"] == []  # no twin, no ratio
