"""spotrain's planner against the policies users have today, on every trace set in ../shared/data.

For each trace set: one simulated job (the spec's work and deadline, derived from the traces),
every policy driven through the same ControlLoop, and spotrain's cost ratio to each baseline and
to the offline oracle. Then the planner's time to place a fleet over 10,000 offers, against
sorting the offers by price (the least any placement must do) measured in the same run.

    .venv/bin/python benchmarks/planner_vs_baselines.py [--json] [--data ../shared/data] [--quick]
        [--only SUBSTRING] [--offset HOURS]

`--offset` starts every job that many hours into its traces (sets too short for it are skipped),
to check that a result does not hang on one window of the market.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from spotrain.config import ClusterSpec
from spotrain.market import catalog_offers
from spotrain.policies import FleetMember, PlacementContext, get_policy
from spotrain.progress_bars import StepBars
from spotrain.providers.base import Offer
from spotrain.sim.engine import STARTUP_SECONDS, Job, Progress, compare, fleet_pace
from spotrain.sim.oracle import fastest_spot_hours, oracle_cost
from spotrain.sim.traces import LocationTrace, load_trace

POLICIES = ["spotrain", "eager-next-region", "uniform-progress", "on-demand", "oracle"]
SPOT = "spot-traces"


def trace_sets(data: Path) -> list[dict]:
    """(name, files, workers, job, optional `prepare` of the loaded traces) for every trace set;
    equal-GPU files per set."""
    def files(folder: str, pattern: str = "*") -> list[Path]:
        return sorted((data / folder).glob(pattern))

    return [
        {"name": "aws V100 1-node availability, 9 zones (calibration)", "files":
         files(f"{SPOT}/availability/1-node/aws-02-15-2023", "*.json"), "workers": 1, "work_h": 48, "deadline_h": 96},
        {"name": "aws V100 1-node availability, 2 zones, 2022", "files":
         files(f"{SPOT}/availability/1-node/aws-10-26-2022", "*_v100_1.json"), "workers": 1, "work_h": 48,
         "deadline_h": 96},
        {"name": "aws K80 1-node availability, 2 zones, 2022", "files":
         files(f"{SPOT}/availability/1-node/aws-10-26-2022", "*_k80_1.json"), "workers": 1, "work_h": 48,
         "deadline_h": 96},
        {"name": "aws V100 16-node availability, 3 zones, 8 workers", "files":
         files(f"{SPOT}/availability/16-node/aws-08-27-2023", "*.json"), "workers": 8, "work_h": 48,
         "deadline_h": 96},
        {"name": "aws V100 1-node preemption, 4 zones", "files":
         files(f"{SPOT}/preemption/1-node/aws-04-22-2023", "*.json"), "workers": 1, "work_h": 48, "deadline_h": 96},
        {"name": "aws r5.16xlarge preemption, 3 zones, per-zone prices", "files":
         files(f"{SPOT}/preemption/1-node/aws-04-19-2023", "*.json"), "workers": 1, "work_h": 48, "deadline_h": 96},
        {"name": "aws V100 availability moved to 8 regions, real p3.2xlarge prices (2022-05-31)",
         "files": files(f"{SPOT}/availability/1-node/aws-02-15-2023", "*.json"), "workers": 1, "work_h": 48,
         "deadline_h": 96, "prepare": lambda traces: priced_regions(traces, data)},
        {"name": "T4 in AWS, GCP, Azure zones (V100 preemption-trace availability), catalog prices",
         "files": files(f"{SPOT}/preemption/1-node/aws-04-22-2023", "*.json"), "workers": 1, "work_h": 48,
         "deadline_h": 96, "prepare": across_clouds},
        {"name": "gcp c3-highcpu-88 preemption, 4 zones", "files":
         files(f"{SPOT}/preemption/1-node/gcp-04-30-2023", "*.json"), "workers": 1, "work_h": 12, "deadline_h": 24},
        {"name": "aws V100 4-node preemption, 3 zones, 4 workers", "files":
         files(f"{SPOT}/preemption/4-node/aws-08-03-2023", "*.json"), "workers": 4, "work_h": 48, "deadline_h": 96},
        {"name": "bamboo p3 32-node events, 8 workers", "files": [data / "bamboo/traces/p3-trace.csv"],
         "workers": 8, "work_h": 3, "deadline_h": 10},
        {"name": "bamboo g4dn 24-node events, 8 workers", "files": [data / "bamboo/traces/g4dn-trace.csv"],
         "workers": 8, "work_h": 3, "deadline_h": 10},
        {"name": "bamboo gcloud V100 counts, 4 workers", "files": [data / "bamboo/traces/gcloud/v100x1-east1c.txt"],
         "workers": 4, "work_h": 8, "deadline_h": 20},
        {"name": "parcae p3 node counts, 8 workers", "files": [data / "parcae/traces/p3.csv"],
         "workers": 8, "work_h": 3, "deadline_h": 10},
    ]


# The real AWS spot price sample (2022-05-31): AZ ids such as "use1-az2" name their region.
PRICE_SAMPLE = "aws-spot-price-history/05.tsv.zst"
_DIRECTIONS = {"e": "east", "w": "west", "c": "central", "n": "north", "s": "south", "ne": "northeast",
               "se": "southeast", "nw": "northwest", "sw": "southwest"}


def region_of_az_id(az_id: str) -> str:
    code = az_id.split("-")[0]  # "apne1"
    return f"{code[:2]}-{_DIRECTIONS[code[2:-1]]}-{code[-1]}"


def sample_prices(data: Path, instance_type: str) -> dict[str, float]:
    """Region -> the cheapest zone's last Linux spot price of `instance_type` in the real sample."""
    text = subprocess.run(["zstd", "-dc", str(data / PRICE_SAMPLE)], capture_output=True, text=True,
                          check=True).stdout
    last: dict[str, tuple[str, float]] = {}  # AZ id -> (time, price)
    for line in text.splitlines():
        az, itype, os_name, price, stamp = line.split("\t")
        if itype == instance_type and os_name == "Linux/UNIX" and stamp >= last.get(az, ("", 0.0))[0]:
            last[az] = (stamp, float(price))
    regions: dict[str, float] = {}
    for az, (_, price) in last.items():
        region = region_of_az_id(az)
        regions[region] = min(price, regions.get(region, price))
    return regions


def priced_regions(traces: list[LocationTrace], data: Path) -> list[LocationTrace]:
    """Per-region prices that differ, from real data: the V100 availability patterns, in file
    order, moved to the sample's regions in alphabetical order (a price-blind user's list, which
    eager-next-region follows), each with its real p3.2xlarge spot price."""
    prices = sample_prices(data, "p3.2xlarge")
    return [replace(trace, location=f"aws:{region}a", prices=(prices[region],) * len(trace.times))
            for trace, region in zip(traces, sorted(prices))]


CLOUDS = ["aws:us-east-1a", "gcp:us-central1-a", "azure:eastus-1"]  # a user's order: AWS first, Azure last


def across_clouds(traces: list[LocationTrace]) -> list[LocationTrace]:
    """Per-cloud prices that differ: the first V100 availability patterns, in file order, as one
    T4 zone in each cloud, priced from the catalog (its reference spot prices per cloud). The
    patterns come from a set with spot through the job's window, so prices decide, not the
    deadline (the 9-zone patterns have almost no spot in the first 48 h)."""
    return [replace(trace, location=location, gpu="T4", prices=None)
            for trace, location in zip(traces, CLOUDS)]


def spec_for(workers: int) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "bench", "budget": {"total_usd": 100000.0},
        "training": {"t4_samples_per_second": 100.0, "target_batch_size": 4096, "model_parameters": 125_000_000,
                     "compression": {"gradients": "float16"}},
        "placement": {"workers": workers},
    })


def run_set(entry: dict, tick: float, offset_hours: float = 0.0, progress: Progress | None = None) -> dict | None:
    """One trace set's comparison, or None when its traces end before a job started
    `offset_hours` in would reach its deadline. `progress` hears of each policy as it runs."""
    traces = [load_trace(f) for f in entry["files"]]
    traces = entry.get("prepare", lambda t: t)(traces)
    if (offset_hours + entry["deadline_h"]) * 3600.0 > min(t.horizon for t in traces):
        return None
    spec = spec_for(entry["workers"])
    rate = fleet_pace(spec, traces)  # the workers' pace in one zone, communication included
    job = Job(target_samples=rate * entry["work_h"] * 3600.0, deadline_hours=float(entry["deadline_h"]),
              start_offset=offset_hours * 3600.0)
    results = {r["policy"]: r for r in compare(spec, traces, POLICIES, job, tick, progress=progress)}
    ours = results["spotrain"]
    ratios = {name: (ours["spent_usd"] / r["spent_usd"] if r["spent_usd"] else None)
              for name, r in results.items() if name != "spotrain"}
    time_ratios = {name: (ours["hours"] / r["hours"] if r["hours"] else None)
                   for name, r in results.items() if name not in ("spotrain", "oracle")}
    eager = results["eager-next-region"]
    # What no policy can beat, against eager-next-region: the oracle's cost, the time of the whole
    # fleet in one zone from the start, never preempted (on-demand's run), and spot's best time.
    spot_hours = fastest_spot_hours(traces, spec.task_profile(), entry["workers"], job.target_samples,
                                    job.deadline_hours, tick, job.start_offset)
    bounds = {"oracle_cost_vs_eager": results["oracle"]["spent_usd"] / eager["spent_usd"],
              "fastest_hours_vs_eager": results["on-demand"]["hours"] / eager["hours"],
              "fastest_spot_hours_vs_eager": spot_hours / eager["hours"] if spot_hours else None}
    if entry["workers"] == 1 and not eager["missed_deadline"]:
        # The least any policy pays that finishes no later than eager-next-region: the exact
        # oracle with eager's finish as its deadline (a hair over it, against float rounding).
        by_eager = oracle_cost(traces, rate, job.target_samples, eager["hours"] + 1e-6, 1, tick,
                               STARTUP_SECONDS, job.start_offset)
        bounds["oracle_cost_by_eager_time_vs_eager"] = by_eager.spent_usd / eager["spent_usd"]
        bounds["oracle_cost_by_eager_time_vs_oracle"] = by_eager.spent_usd / results["oracle"]["spent_usd"]
    return {"trace_set": entry["name"], "workers": entry["workers"], "offset_hours": offset_hours,
            "locations": [t.location for t in traces],
            "policies": results, "spotrain_cost_ratio": ratios, "spotrain_time_ratio": time_ratios,
            "bounds_vs_eager": bounds}


def planning_time(offers_wanted: int = 10_000, workers: int = 8, repeats: int = 5) -> dict:
    base = [o for o in catalog_offers("spot") if o.gpu]
    rng = random.Random(0)
    offers = [Offer(o.provider, o.location, f"{o.instance_type}-{i}", o.gpu,
                    o.spot_usd_per_hour * rng.uniform(0.5, 1.5))
              for i in range(offers_wanted // len(base) + 1) for o in base][:offers_wanted]
    policy = get_policy("spotrain")
    spec = spec_for(workers)

    def place() -> None:
        ctx = PlacementContext(now=0.0, workers=workers)
        for n in range(workers + 2):
            offer = policy.choose(offers, ctx)
            ctx = replace(ctx, fleet=ctx.fleet + (FleetMember(str(n), offer.location, offer.spot_usd_per_hour,
                                                              offer.gpu),))

    def baseline() -> None:
        sorted(offers, key=lambda o: o.spot_usd_per_hour)

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    del spec
    ours, sort = best_of(place), best_of(baseline)
    return {"offers": len(offers), "workers_placed": workers + 2, "planner_ms": ours * 1000,
            "sort_by_price_ms": sort * 1000, "ratio_to_sort": ours / sort}


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"  # as the CLI's simulate table says it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--tick", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="the calibration set only")
    parser.add_argument("--only", default="", help="only trace sets whose name contains this")
    parser.add_argument("--offset", type=float, default=0.0, help="start each job this many hours into its traces")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"planner_vs_baselines: error: no trace data at {args.data}", file=sys.stderr)
        return 2
    sets = trace_sets(args.data)[:1] if args.quick else trace_sets(args.data)
    sets = [s for s in sets if args.only in s["name"]]
    rows = []
    with StepBars(len(sets) + 1) as bars:  # every trace set, then the planning time
        for entry in sets:
            bars.start(f"trace set: {entry['name']}")
            with bars.substeps(len(POLICIES)) as policies:
                row = run_set(entry, args.tick, args.offset, progress=policies)
            if row is None:
                bars.say(f"  skipped: its traces end before a job started {args.offset:g} h in is due")
            else:
                rows.append(row)
        bars.start("planning time over 10,000 offers")
        timing = planning_time()
    if args.json:
        print(json.dumps({"trace_sets": rows, "planning": timing}))
        return 0
    for row in rows:
        start = f", starting {row['offset_hours']:g} h in" if row["offset_hours"] else ""
        print(f"\n{row['trace_set']}  ({row['workers']} worker(s), {len(row['locations'])} location(s){start})")
        print(f"  {'policy':<18} {'done':>5} {'on time':>8} {'hours':>7} {'spent $':>10} {'preempt':>8}")
        for name, r in row["policies"].items():
            print(f"  {name:<18} {yes_no(r['finished']):>5} {yes_no(not r['missed_deadline']):>8} {r['hours']:7.1f} "
                  f"{r['spent_usd']:10.2f} {r['preemptions']:8d}")
        cost = "  ".join(f"{k} {v:.3f}x" for k, v in row["spotrain_cost_ratio"].items() if v)
        hours = "  ".join(f"{k} {v:.3f}x" for k, v in row["spotrain_time_ratio"].items() if v)
        print(f"  spotrain cost vs: {cost}")
        print(f"  spotrain time vs: {hours}")
        bounds = row["bounds_vs_eager"]
        spot = bounds["fastest_spot_hours_vs_eager"]
        print(f"  no policy beats, vs eager-next-region: cost {bounds['oracle_cost_vs_eager']:.3f}x (oracle), "
              f"time {bounds['fastest_hours_vs_eager']:.3f}x (whole fleet, never preempted)"
              + (f", spot-only time {spot:.3f}x" if spot else ""))
        if "oracle_cost_by_eager_time_vs_eager" in bounds:
            print(f"  finishing no later than eager-next-region costs at least "
                  f"{bounds['oracle_cost_by_eager_time_vs_eager']:.3f}x its cost "
                  f"({bounds['oracle_cost_by_eager_time_vs_oracle']:.3f}x the oracle's)")
    print(f"\nplanning {timing['offers']} offers, {timing['workers_placed']} workers: {timing['planner_ms']:.1f} ms "
          f"(sorting the offers by price: {timing['sort_by_price_ms']:.1f} ms, ratio {timing['ratio_to_sort']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
