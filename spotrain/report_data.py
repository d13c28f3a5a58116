"""What a run's report shows besides its summary, from the ledger alone: the headline (duration,
the on-demand equivalent and the savings, the newest checkpoint), the figures per location, and
the time series behind the HTML page's plots."""

from __future__ import annotations

import math
import time
from collections import defaultdict

from spotrain.contracts.states import AgentState
from spotrain.errors import SpecError, SpotrainError
from spotrain.ledger import InstanceRow, Ledger, Run
from spotrain.market import Location, catalog

# The local provider's zones replay spot traces recorded on these AWS instance types in us-east-1:
# their on-demand price is what a local run is compared with.
LOCAL_TRACE_TYPES = {"bamboo-p3": "p3.2xlarge", "bamboo-g4dn": "g4dn.xlarge"}
LOCAL_REFERENCE = ("aws", "us-east-1")


def select_run(ledger: Ledger, cluster: str, number: int | None) -> Run:
    """The run numbered `number`, or the latest."""
    run = ledger.current_run() if number is None else ledger.run(number)
    if run is None and number is None:
        raise SpotrainError(f"cluster {cluster!r} has no run")
    if run is None:
        runs = ", ".join(str(n) for n in ledger.run_ids())
        raise SpotrainError(f"--run: cluster {cluster!r} has no run {number} (its runs: {runs})")
    return run


def on_demand_usd_per_hour(row: InstanceRow, spec: dict) -> float | None:
    """What the instance would have cost per hour on demand; None when the catalog does not say."""
    if row.market == "on-demand":
        return row.price_usd_per_hour
    provider, _, place = row.location.partition(":")
    if provider == "local":
        zone = spec.get("providers", {}).get("local", {}).get("locations", {}).get(place, {})
        instance_type = LOCAL_TRACE_TYPES.get(zone.get("trace", ""))
        provider, region = LOCAL_REFERENCE
    else:
        instance_type, region = row.instance_type, Location.parse(row.location).region
    return next((c.on_demand_usd_per_hour for c in catalog()
                 if (c.provider, c.region, c.instance_type) == (provider, region, instance_type)), None)


def samples_by_instance(ledger: Ledger, run: Run) -> dict[str, int]:
    """Each agent's samples: the most it reported (its count restarts with the agent)."""
    samples: dict[str, int] = defaultdict(int)
    for m in ledger.metrics(run.id):
        samples[m["instance_id"]] = max(samples[m["instance_id"]], m["samples"])
    return dict(samples)


def by_location(ledger: Ledger, run: Run) -> list[dict]:
    """Per location: spend, instance-seconds, samples, $/1M samples, and the same on demand."""
    rows = ledger.instances(run_id=run.id)
    location_of = {r.request_id: r.location for r in rows}
    samples = samples_by_instance(ledger, run)
    result: dict[str, dict] = {}
    for r in rows:
        result.setdefault(r.location, {"location": r.location, "usd": 0.0, "seconds": 0.0, "samples": 0,
                                       "on_demand_usd": 0.0, "instances": 0})
        result[r.location]["samples"] += samples.get(r.instance_id or "", 0)
        result[r.location]["instances"] += r.launched_at is not None
    seconds_by_request: dict[str, float] = defaultdict(float)
    for charge in ledger.spend_intervals(run.id):
        entry = result[location_of.get(charge["request_id"], charge["location"])]
        entry["usd"] += charge["usd"]
        entry["seconds"] += charge["t_end"] - charge["t_start"]
        seconds_by_request[charge["request_id"]] += charge["t_end"] - charge["t_start"]
    for r in rows:
        price = on_demand_usd_per_hour(r, run.spec)
        entry = result[r.location]
        if price is None or entry["on_demand_usd"] is None:
            entry["on_demand_usd"] = None  # one instance the catalog cannot price: no comparison
        else:
            entry["on_demand_usd"] += price * seconds_by_request[r.request_id] / 3600.0
    for entry in result.values():
        entry["cost_per_million_samples_usd"] = _per_million(entry["usd"], entry["samples"])
        entry["on_demand_cost_per_million_samples_usd"] = _per_million(entry["on_demand_usd"],
                                                                       entry["samples"])
    return sorted(result.values(), key=lambda e: e["location"])


def headline(ledger: Ledger, run: Run, cluster: str, now: float | None = None) -> dict:
    """Duration, spend, the on-demand equivalent of the fleet and the savings against it, the
    throughput planned and reached, the checkpoints."""
    locations = by_location(ledger, run)
    prices = [entry["on_demand_usd"] for entry in locations]
    on_demand = sum(prices) if prices and None not in prices else None
    spent = ledger.spent(run.id)
    samples, samples_per_second = throughput(ledger, run)
    folder, epoch = newest_checkpoint(run, cluster)
    end = run.ended_at if run.ended_at is not None else (now or time.time())
    return {
        "started_at": run.started_at, "ended_at": run.ended_at,
        "duration_seconds": max(0.0, end - run.started_at),
        "spent_usd": spent,
        "samples": samples,
        "samples_per_second": samples_per_second,
        "cost_per_million_samples_usd": _per_million(spent, samples),
        "planned": planned(ledger, run),
        "on_demand_usd": on_demand,
        "savings_fraction": 1.0 - spent / on_demand if on_demand else None,
        "checkpoint_dir": folder, "checkpoint_epoch": epoch,
        "checkpoint_path": f"{folder} (epoch {epoch}; `spotrain export` writes its model)"
        if folder and epoch is not None else None,
        "locations": locations,
    }


def throughput(ledger: Ledger, run: Run) -> tuple[int, float]:
    """The run's samples (each agent's most) and samples/s between its first and last metrics."""
    metrics = ledger.metrics(run.id)
    span = metrics[-1]["t"] - metrics[0]["t"] if len(metrics) > 1 else 0.0
    samples = sum(samples_by_instance(ledger, run).values())
    return samples, samples / span if span > 0 else 0.0


def planned(ledger: Ledger, run: Run) -> dict[str, float | None] | None:
    """What `spotrain plan` gave when the run was launched (spotrain.cluster_ops.record_plan); None
    for a run launched by a spotrain that did not record it."""
    from spotrain.plan import PLANNED_FIGURES, plan_meta_key

    stored = ledger.meta(plan_meta_key(run.id))
    if not isinstance(stored, dict):
        return None
    figures = {name: stored.get(name) for name in PLANNED_FIGURES}
    for name, value in figures.items():
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise SpotrainError(f"ledger meta {plan_meta_key(run.id)}: {name} is {value!r}, not a number")
    return figures


def planned_against_actual(report: dict, arrow: str = "->") -> list[tuple[str, str]]:
    """The headline's rows comparing the run with its plan, for the terminal and the page alike."""
    plan = report["planned"]
    if plan is None:
        plan = dict.fromkeys(("samples_per_second", "cost_per_million_samples_usd"))
        note = "not recorded"
    else:
        note = "-"
    rate, planned_rate = report["samples_per_second"], plan["samples_per_second"]
    share = f" ({rate / planned_rate:.0%} of plan)" if planned_rate else ""
    rate_text = note if planned_rate is None else f"{planned_rate:.1f}"
    cost = plan["cost_per_million_samples_usd"]
    cost_text = note if cost is None else format_usd(cost)
    return [(f"samples/s planned {arrow} actual", f"{rate_text} {arrow} {rate:.1f}{share}"),
            (f"cost per 1M samples planned {arrow} actual",
             f"{cost_text} {arrow} {format_usd(report['cost_per_million_samples_usd'])}")]


def newest_checkpoint(run: Run, cluster: str) -> tuple[str | None, int | None]:
    """The store holding the run's newest complete checkpoint (every store, when none does) and
    its epoch (a manifest is written last, so one that lists only present files is whole). Only
    manifests an admitted peer sealed count (spotrain.stores.seal): one planted in a store is none."""
    from spotrain.access import checkpoint_trust
    from spotrain.geo import store_network
    from spotrain.home import cluster_dir
    from spotrain.spec_file import stored_spec
    from spotrain.stores import ReplicatedStore, StoreError

    try:
        spec = stored_spec(run.spec)
    except SpecError:  # a spec from a version that knew other keys
        return None, None
    urls = spec.checkpoint_stores()
    try:
        with store_network(spec, cluster) as reachable:
            if not reachable:  # an emulated cloud's buckets, gone with it at `down`
                return ", ".join(urls), None
            audit = ReplicatedStore.from_urls(urls, trust=checkpoint_trust(cluster_dir(cluster), cluster)).audit()
    except StoreError:  # a store that cannot be opened from here: the report still stands
        return ", ".join(urls), None
    held = [store for store in audit.stores if store.newest_epoch is not None]
    if not held:
        return ", ".join(urls), None
    newest = max(held, key=lambda store: store.newest_epoch or 0)
    return newest.url, newest.newest_epoch


def series(ledger: Ledger, run: Run, now: float | None = None) -> dict:
    """Seconds since the run started against: spend so far, each instance's life, samples/s and loss."""
    t0, end = run.started_at, run.ended_at if run.ended_at is not None else (now or time.time())
    spend, total = [(0.0, 0.0)], 0.0
    charges = [(c["t_end"], c["usd"]) for c in ledger.spend_intervals(run.id)]
    charges += [(c["t"], c["usd"]) for c in ledger.egress_intervals(run.id)]  # the budget pays egress too
    for t, usd in sorted(charges):
        total += usd
        spend.append((t - t0, total))
    fleet = [{"instance_id": r.instance_id, "location": r.location, "start": r.launched_at - t0,
              "end": (r.ended_at if r.ended_at is not None else end) - t0, "state": r.state,
              "end_reason": r.end_reason or ""}
             for r in ledger.instances(run_id=run.id) if r.launched_at is not None]
    rate: dict[float, float] = defaultdict(float)
    losses: dict[float, list[float]] = defaultdict(list)
    for m in ledger.metrics(run.id):
        if m["state"] == AgentState.TRAINING:
            rate[m["t"]] += m["samples_per_second"]
            if m["loss"] is not None:
                losses[m["t"]].append(m["loss"])
    progress = [(t - t0, rate[t], sum(losses[t]) / len(losses[t]) if losses[t] else None)
                for t in sorted(rate)]
    return {"spend": spend, "fleet": fleet, "progress": progress, "duration_seconds": end - t0}


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_usd(value: float | None) -> str:
    """Cents for a dollar or more, three significant digits below (a short local run costs $0.0118/1M)."""
    if value is None:
        return "-"
    return f"${value:.2f}" if value >= 1 else f"${value:.3g}"


def _per_million(usd: float | None, samples: int) -> float | None:
    return usd / samples * 1e6 if usd is not None and samples else None
