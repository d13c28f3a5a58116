"""The offline optimum: what a policy that knew the whole future would have paid.

One worker: an exact dynamic program over (tick, progress) with one mode per spot zone plus
on-demand; entering a mode costs `startup` ticks paid without progress (and spot must stay
available through them); a spot mode ends when its zone's capacity does. Several workers: a
relaxed lower bound (each tick any fleet size up to `workers` at the cheapest prices then
available and that size's one-zone pace, no startup; a Lagrangian dual of that problem).
`fastest_spot_hours` bounds the time instead: no spot-only policy finishes sooner. Both assume
the traces share one GPU type, as the job's pace does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spotrain.market import Location
from spotrain.sim.provider import catalog_prices
from spotrain.sim.traces import LocationTrace
from spotrain.throughput import TaskProfile, Worker, estimate


@dataclass(frozen=True)
class OracleResult:
    spent_usd: float
    hours: float
    exact: bool  # False: a relaxed lower bound


def _availability(trace: LocationTrace, ticks: int, tick: float, offset: float) -> np.ndarray:
    return np.array([trace.capacity_at(offset + i * tick) for i in range(ticks)], dtype=np.int64)


def oracle_cost(traces: list[LocationTrace], samples_per_worker_second: float, target_samples: float,
                deadline_hours: float, workers: int = 1, tick: float = 120.0, startup_seconds: float = 360.0,
                start_offset: float = 0.0, fleet_rate: Sequence[float] | None = None) -> OracleResult:
    """`fleet_rate[k]`: samples/s of k workers in one zone (k = 0..workers), for several workers;
    without it, k x `samples_per_worker_second`."""
    ticks = int(deadline_hours * 3600 // tick)
    per_tick = samples_per_worker_second * tick
    spot = [catalog_prices(t.location, t.gpu)[1] if (price := t.price_at(start_offset)) is None else price
            for t in traces]
    on_demand = min(catalog_prices(t.location, t.gpu)[2] for t in traces)
    capacity = [_availability(t, ticks, tick, start_offset) for t in traces]
    if workers > 1:
        rates = fleet_rate if fleet_rate is not None else [k * samples_per_worker_second
                                                           for k in range(workers + 1)]
        return _relaxed(capacity, spot, on_demand, rates, target_samples, tick)
    return _exact(capacity, spot, on_demand, math.ceil(target_samples / per_tick), math.ceil(startup_seconds / tick),
                  tick, ticks)


def _exact(capacity: list[np.ndarray], spot: list[float], on_demand: float, work: int, startup: int,
           tick: float, ticks: int) -> OracleResult:
    hours = tick / 3600.0
    prices = [p * hours for p in spot] + [on_demand * hours]
    available = [c > 0 for c in capacity] + [np.ones(ticks, dtype=bool)]
    modes = len(prices)
    # ticks from t on during which mode m stays available
    run = [np.zeros(ticks + 1, dtype=np.int64) for _ in range(modes)]
    for m in range(modes):
        for t in range(ticks - 1, -1, -1):
            run[m][t] = run[m][t + 1] + 1 if available[m][t] else 0
    inf = math.inf
    idle = np.full(work + 1, inf)
    idle[0] = 0.0
    warm = [np.full(work + 1, inf) for _ in range(modes)]
    arriving: dict[int, list[np.ndarray | None]] = {}
    best_done = (inf, inf)
    for t in range(ticks):
        for m, array in enumerate(arriving.pop(t, [])):
            if array is not None:
                np.minimum(warm[m], array, out=warm[m])
        any_state = np.minimum.reduce([idle] + warm)
        if any_state[work] < best_done[0]:
            best_done = (float(any_state[work]), t * hours)
        for m in range(modes):  # start mode m now: `startup` paid ticks, then warm
            if startup == 0 or run[m][t] >= startup:
                slot = arriving.setdefault(t + startup, [None] * modes)
                candidate, earlier = any_state + prices[m] * startup, slot[m]
                slot[m] = candidate if earlier is None else np.minimum(earlier, candidate)
        idle = any_state
        new_warm = []
        for m in range(modes):  # run one productive tick where the mode is available
            step = np.full(work + 1, inf)
            if available[m][t]:
                step[1:] = warm[m][:-1] + prices[m]
                step[work] = min(step[work], warm[m][work] + prices[m])
            new_warm.append(step)
        warm = new_warm
    final = float(np.minimum.reduce([idle] + warm)[work])
    if final < best_done[0]:
        best_done = (final, ticks * hours)
    return OracleResult(best_done[0], best_done[1], exact=True)


def _relaxed(capacity: list[np.ndarray], spot: list[float], on_demand: float, fleet_rate: Sequence[float],
             target_samples: float, tick: float) -> OracleResult:
    """A Lagrangian lower bound: each tick runs any k <= workers at the k cheapest prices then
    available (spot, then on-demand) and trains at k workers' one-zone pace (the fastest k can
    go), no startup. Smaller fleets train more per worker (less communication), so k is free."""
    hours = tick / 3600.0
    workers = len(fleet_rate) - 1
    ticks = len(capacity[0])
    prices = np.array(spot + [on_demand])
    order = np.argsort(prices)
    slots = np.concatenate([np.maximum(np.stack(capacity, axis=1), 0), np.full((ticks, 1), workers)],
                           axis=1)[:, order]
    cost = np.zeros((ticks, workers + 1))  # cost[t, k]: the k cheapest worker-ticks at tick t
    for k in range(1, workers + 1):
        taken = np.minimum(slots, k)
        taken = np.minimum(taken, np.maximum(0, k - (np.cumsum(taken, axis=1) - taken)))
        cost[:, k] = taken @ prices[order] * hours
    progress = np.asarray(fleet_rate, dtype=float) * tick
    if progress[-1] * ticks < target_samples:
        return OracleResult(math.inf, math.inf, exact=False)

    def dual(price_per_sample: float) -> float:  # weak duality: a lower bound for every price >= 0
        per_tick = np.min(cost - price_per_sample * progress, axis=1)
        return float(per_tick.sum() + price_per_sample * target_samples)

    low, high = 0.0, float(cost[:, -1].max()) / max(float(progress[1]), 1e-12) * 10.0
    for _ in range(200):  # dual() is concave: ternary search
        a, b = low + (high - low) / 3, high - (high - low) / 3
        low, high = (a, high) if dual(a) < dual(b) else (low, b)
    price = (low + high) / 2
    chosen = np.argmin(cost - price * progress, axis=1)
    finish = int(np.searchsorted(np.cumsum(progress[chosen]), target_samples)) + 1
    return OracleResult(max(0.0, dual(price)), min(finish, ticks) * hours, exact=False)


MAX_PACKINGS = 20_000  # per distinct capacity vector; beyond it the bound is not computed


def fastest_spot_hours(traces: list[LocationTrace], profile: TaskProfile, workers: int, target_samples: float,
                       deadline_hours: float, tick: float = 120.0, start_offset: float = 0.0) -> float | None:
    """A lower bound on any spot-only finish: every tick, the fastest fleet of at most `workers`
    that the capacity then allows (spread over locations or not), no startup, moves for free.
    None when it does not finish before the deadline or there are too many packings to try."""
    places = [Location.parse(t.location) for t in traces]
    best_rate: dict[tuple[int, ...], float] = {}

    def fastest(capacity: tuple[int, ...]) -> float:
        if capacity not in best_rate:
            ranges = [range(min(c, workers) + 1) for c in capacity]
            if math.prod(len(r) for r in ranges) > MAX_PACKINGS:
                raise OverflowError
            rate = 0.0
            for counts in itertools.product(*ranges):
                if 0 < sum(counts) <= workers:
                    fleet = [Worker(place, trace.gpu) for place, trace, k in zip(places, traces, counts)
                             for _ in range(k)]
                    rate = max(rate, estimate(fleet, profile).samples_per_second)
            best_rate[capacity] = rate
        return best_rate[capacity]

    done, ticks = 0.0, int(deadline_hours * 3600 // tick)
    try:
        for n in range(ticks):
            if done >= target_samples:
                return n * tick / 3600.0
            done += fastest(tuple(t.capacity_at(start_offset + n * tick) for t in traces)) * tick
    except OverflowError:
        return None
    return ticks * tick / 3600.0 if done >= target_samples else None
