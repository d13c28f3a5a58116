"""The offline optimum: what a policy that knew the whole future would have paid.

One worker: an exact dynamic program over (tick, progress) with one mode per spot zone plus
on-demand; entering a mode costs `startup` ticks paid without progress (and spot must stay
available through them); a spot mode ends when its zone's capacity does. Several workers: a
relaxed lower bound (the cheapest worker-ticks available before the deadline, at most `workers`
per tick, no startup or communication cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotrain.sim.market import catalog_prices
from spotrain.sim.traces import LocationTrace


@dataclass(frozen=True)
class OracleResult:
    spent_usd: float
    hours: float
    exact: bool  # False: a relaxed lower bound


def _availability(trace: LocationTrace, ticks: int, tick: float, offset: float) -> np.ndarray:
    return np.array([trace.capacity_at(offset + i * tick) for i in range(ticks)], dtype=np.int64)


def oracle_cost(traces: list[LocationTrace], samples_per_worker_second: float, target_samples: float,
                deadline_hours: float, workers: int = 1, tick: float = 120.0, startup_seconds: float = 360.0,
                start_offset: float = 0.0) -> OracleResult:
    ticks = int(deadline_hours * 3600 // tick)
    per_tick = samples_per_worker_second * tick
    spot = [(catalog_prices(t.location, t.gpu)[1] if t.price_at(start_offset) is None else t.price_at(start_offset))
            for t in traces]
    on_demand = min(catalog_prices(t.location, t.gpu)[2] for t in traces)
    capacity = [_availability(t, ticks, tick, start_offset) for t in traces]
    if workers > 1:
        return _relaxed(capacity, spot, on_demand, math.ceil(target_samples / per_tick), workers, tick)
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
    arriving: dict[int, list[np.ndarray]] = {}
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
                candidate = any_state + prices[m] * startup
                slot[m] = candidate if slot[m] is None else np.minimum(slot[m], candidate)
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


def _relaxed(capacity: list[np.ndarray], spot: list[float], on_demand: float, worker_ticks: int, workers: int,
             tick: float) -> OracleResult:
    hours = tick / 3600.0
    order = np.argsort(spot)
    slots: list[float] = []
    for t in range(len(capacity[0])):
        left = workers
        for z in order:
            take = min(left, int(capacity[z][t]))
            slots.extend([spot[z]] * take)
            left -= take
        slots.extend([on_demand] * left)
    slots.sort()
    if len(slots) < worker_ticks:
        return OracleResult(math.inf, math.inf, exact=False)
    return OracleResult(float(sum(slots[:worker_ticks])) * hours, worker_ticks / workers * hours, exact=False)
