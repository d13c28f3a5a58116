"""Trace loaders on the real data, the replayed market, and simulated jobs through the real loop."""

import json
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from spotrain.config import ClusterSpec
from spotrain.sim.engine import STARTUP_SECONDS, Job, compare, simulate
from spotrain.sim.oracle import fastest_spot_hours, oracle_cost
from spotrain.sim.traces import TraceError, load_trace, load_traces

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared trace data is not beside this checkout")


@needs_data
@pytest.mark.parametrize("relative, location, gpu, peak", [
    ("spot-traces/availability/1-node/aws-02-15-2023/us-west-2a_v100_1.json", "aws:us-west-2a", "V100", 1),
    ("spot-traces/availability/16-node/aws-08-27-2023/us-east-2b_v100_1.json", "aws:us-east-2b", "V100", 16),
    ("spot-traces/preemption/1-node/gcp-04-30-2023/us-east1-b_c3-88.json", "gcp:us-east1-b", None, 1),
    ("bamboo/traces/p3-trace.csv", "trace:p3-trace", "V100", 32),
    ("bamboo/traces/gcloud/v100x1-east1c.txt", "gcp:us-east1-c", "V100", 80),
    ("parcae/traces/p3.csv", "trace:p3", "V100", 32),
    ("parcae/traces/bert/trace_hh_55_65.txt", "trace:trace_hh_55_65", None, 32),
])
def test_every_format_loads(relative, location, gpu, peak):
    trace = load_trace(DATA / relative)
    assert (trace.location, trace.gpu, max(trace.capacity)) == (location, gpu, peak)
    assert list(trace.times) == sorted(trace.times) and trace.times[0] == 0


@needs_data
def test_prices_come_with_preemption_traces():
    trace = load_trace(DATA / "spot-traces/preemption/1-node/aws-04-19-2023/us-east-1d_intel_64.json")
    assert trace.price_at(0) == pytest.approx(1.14)


def test_bad_traces_name_the_file(tmp_path):
    empty = tmp_path / "us-east-1a_v100_1.json"
    empty.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": []}))
    with pytest.raises(TraceError, match=f"{empty}: empty trace"):
        load_trace(empty)
    odd = tmp_path / "weird.csv"
    odd.write_text("a,b,c,d\n1,2,3,4\n")
    with pytest.raises(TraceError, match=f"{odd}: unknown trace format"):
        load_trace(odd)
    with pytest.raises(TraceError, match="no such file"):
        load_traces([tmp_path / "missing"])


def synthetic(tmp_path: Path, zone: str, data: list[int], gap: int = 600) -> Path:
    path = tmp_path / f"{zone}_v100_1.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": data}))
    return path


def spec(workers=1, budget=1000.0) -> ClusterSpec:
    return ClusterSpec.model_validate({"name": "sim", "budget": {"total_usd": budget},
                                       "placement": {"workers": workers}})


def test_a_preempted_job_moves_zone_and_finishes(tmp_path):
    # zone a has spot for 2 hours, zone b for the whole day
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [1] * 12 + [0] * 132),
                          synthetic(tmp_path, "us-east-1b", [1] * 144)])
    job = Job(target_samples=260 * 3600 * 6, deadline_hours=20)
    result = simulate(spec(), traces, "spotrain", job)
    assert result.finished and not result.missed_deadline and not result.over_budget
    assert result.preemptions >= 1
    oracle = oracle_cost(traces, 260, job.target_samples, job.deadline_hours)
    assert oracle.exact and oracle.spent_usd <= result.spent_usd
    assert oracle.spent_usd >= 6 * 0.918 - 1e-9  # never below the pure spot floor


def test_spotrain_falls_back_to_on_demand_to_meet_the_deadline(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [1] * 6 + [0] * 138)])
    job = Job(target_samples=260 * 3600 * 8, deadline_hours=10)
    results = {r["policy"]: r for r in compare(spec(), traces, ["spotrain", "eager-next-region"], job)}
    assert results["spotrain"]["finished"] and not results["spotrain"]["missed_deadline"]
    assert results["eager-next-region"]["missed_deadline"]  # spot only: nothing after hour 1


def test_samples_up_to_each_preemption_count_so_the_run_ends_on_target(tmp_path):
    # spot for an hour, then none for half an hour, over and over: several preemptions
    traces = load_traces([synthetic(tmp_path, "us-east-1a", ([1] * 6 + [0] * 3) * 16)])
    job = Job(target_samples=260 * 3600 * 3, deadline_hours=24)
    result = simulate(spec(), traces, "spotrain", job)
    assert result.finished and result.preemptions >= 2
    launches = result.preemptions + 1
    paid_hours = 3 + launches * STARTUP_SECONDS / 3600 + 120 / 3600  # the work, each boot, one tick to notice
    assert result.spent_usd <= 0.918 * paid_hours + 1e-9


def test_a_small_budget_ends_the_simulated_run_within_it(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [1] * 144)])
    result = simulate(spec(budget=2.0), traces, "spotrain", Job(260 * 3600 * 20, 24))
    assert not result.finished and result.spent_usd <= 2.0


@needs_data
def test_cli_simulate_json(tmp_path):
    folder = DATA / "spot-traces/preemption/1-node/gcp-04-30-2023"
    config = tmp_path / "c.yaml"
    config.write_text("name: s\nbudget: {total_usd: 1000, deadline_hours: 20}\n"
                      "training: {target_samples: 1000000}\nplacement: {workers: 1}\n")
    result = run_cli("simulate", str(config), "--trace", str(folder), "--policy", "spotrain", "--policy", "oracle",
                     "--json", home=tmp_path / "home", timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [p["policy"] for p in data["policies"]] == ["spotrain", "oracle"]
    for entry in data["policies"]:
        assert set(entry) >= {"policy", "finished", "missed_deadline", "hours", "spent_usd", "samples",
                              "cost_per_million_samples_usd", "preemptions", "over_budget"}


def test_cli_rejects_bad_simulation_input(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: s\nbudget: {total_usd: 0.000001}\n")
    trace = synthetic(tmp_path, "us-east-1a", [1] * 10)
    home = tmp_path / "home"
    result = run_cli("simulate", str(config), "--trace", str(trace), home=home, timeout=120)
    assert result.returncode == 2 and "budget.total_usd" in result.stderr and "one 120s tick" in result.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("nonsense\n")
    result = run_cli("simulate", str(config), "--trace", str(bad), home=home, timeout=120)
    assert result.returncode == 2 and str(bad) in result.stderr
    result = run_cli("simulate", str(config), "--trace", str(trace), "--policy", "magic", home=home, timeout=120)
    assert result.returncode == 2 and "--policy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_plan_json_and_bad_location(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: p\nbudget: {total_usd: 10}\nplacement: {workers: 2, backups: 1, gpu: [T4],\n"
                      "  locations: [aws:us-east-1a, aws:us-east-1b, gcp:us-central1-a]}\n")
    result = run_cli("plan", str(config), "--json", home=tmp_path / "home", timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["placement"]) == 3 and data["samples_per_second"] > 0
    assert data["projected_hours_within_budget"] == pytest.approx(10 / data["usd_per_hour"])
    config.write_text("name: p\nbudget: {total_usd: 10}\nplacement: {locations: [aws:moon-1a]}\n")
    result = run_cli("plan", str(config), home=tmp_path / "home", timeout=120)
    assert result.returncode == 2 and "placement.locations.0: unknown location 'aws:moon-1a'" in result.stderr


def test_the_several_worker_bound_lets_a_smaller_fleet_train_longer(tmp_path):
    # 4 workers wanted; 2 in one zone train more per worker (less communication), so with a loose
    # deadline the bound must be below what 4 full-time workers would pay, and below any policy
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [4] * 144)])
    rates = [0.0, 260.0, 406.0, 520.0, 626.0]
    four_for_ten_hours = 626.0 * 3600 * 10
    bound = oracle_cost(traces, 0.0, four_for_ten_hours, 24, workers=4, fleet_rate=rates)
    assert not bound.exact and bound.spent_usd < 4 * 10 * 0.918
    job = Job(four_for_ten_hours, 24)
    assert bound.spent_usd <= simulate(spec(workers=4), traces, "spotrain", job).spent_usd
    # a deadline only the whole fleet meets leaves no room below it (startup aside)
    tight = oracle_cost(traces, 0.0, four_for_ten_hours, 10, workers=4, fleet_rate=rates)
    assert tight.spent_usd == pytest.approx(4 * 10 * 0.918, rel=1e-3)


def test_no_spot_policy_finishes_before_the_spot_time_bound(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [1] * 12 + [0] * 132),
                          synthetic(tmp_path, "us-east-1b", [0] * 24 + [1] * 120)])
    job = Job(target_samples=260 * 3600 * 6, deadline_hours=20)
    bound = fastest_spot_hours(traces, spec().task_profile(), 1, job.target_samples, job.deadline_hours)
    assert bound == pytest.approx(8.0)  # 2 h in zone a, a 2 h gap, then 4 h in zone b
    assert simulate(spec(), traces, "spotrain", job).hours >= bound


def _benchmark():
    import importlib.util

    path = ROOT / "benchmarks" / "planner_vs_baselines.py"
    module_spec = importlib.util.spec_from_file_location("planner_vs_baselines", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_benchmark_bounds_the_cost_of_finishing_no_later_than_eager(tmp_path):
    # zone a flaps (an hour up, half an hour down), zone b comes late but stays: finishing as
    # early as eager-next-region means paying for the flaps; the oracle held to eager's finish
    # pays no less than the free oracle and no more than eager itself
    files = [synthetic(tmp_path, "us-east-1a", ([1] * 6 + [0] * 3) * 16),
             synthetic(tmp_path, "us-east-1b", [0] * 30 + [1] * 114)]
    entry = {"name": "flaps", "files": files, "workers": 1, "work_h": 4, "deadline_h": 16}
    row = _benchmark().run_set(entry, 120.0)
    bounds = row["bounds_vs_eager"]
    assert bounds["oracle_cost_vs_eager"] <= bounds["oracle_cost_by_eager_time_vs_eager"] <= 1.0 + 1e-9
    assert bounds["oracle_cost_by_eager_time_vs_oracle"] >= 1.0 - 1e-9
    ours = row["policies"]["spotrain"]
    if ours["hours"] <= row["policies"]["eager-next-region"]["hours"]:  # then the bound holds for it too
        assert ours["spent_usd"] / row["policies"]["eager-next-region"]["spent_usd"] >= \
            bounds["oracle_cost_by_eager_time_vs_eager"] - 1e-9


def test_the_benchmark_starts_jobs_later_in_the_traces_or_skips_too_short_ones(tmp_path):
    files = [synthetic(tmp_path, "us-east-1a", [0] * 12 + [1] * 132)]
    entry = {"name": "late", "files": files, "workers": 1, "work_h": 2, "deadline_h": 8}
    benchmark = _benchmark()
    row = benchmark.run_set(entry, 120.0, offset_hours=2.0)  # spot from the start of the job
    assert row["offset_hours"] == 2.0
    assert row["policies"]["eager-next-region"]["hours"] == pytest.approx(2.1, abs=0.05)  # one boot
    assert benchmark.run_set(entry, 120.0, offset_hours=20.0) is None  # the trace ends at 24 h
