"""Property: spend never exceeds the budget, whatever the prices, preemptions and tick jitter, under
every registered placement policy, checked on every tick.

The same reconcile() and BudgetGuard as a real run are driven over random traces; the money is the
exact integral of price over instance lifetime, including the drain after termination, plus the
egress each instance's traffic costs meanwhile (a share of its price, seen by the guard as the
fleet's egress burn). Within the
guard's assumptions (a tick at most one tick late, a drain at most `termination_lag_seconds`) spend
plus what the fleet is committed to never passes the budget at any tick. Beyond them (ticks and
drains longer than the guard assumes) the overrun is bounded by the fleet's burn over the delay the
guard did not foresee, never more.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotrain.budget import BudgetGuard
from spotrain.controller import Desired, EndRun, Launch, Observed, ObservedInstance, Terminate, reconcile
from spotrain.policies import get_policy, policy_names
from spotrain.providers.base import Offer

TICK = 2.0
LAG = 13.0
EPSILON = 1e-9
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw, late: float = 2.0, long_lag: float = 1.0):
    """`late`: how late a tick may come (x TICK); `long_lag`: how much longer than LAG a drain may take."""
    prices = draw(st.lists(st.floats(0.01, 40.0), min_size=1, max_size=4))
    workers, backups = draw(st.integers(1, 6)), draw(st.integers(0, 2))
    # budgets from a few ticks of the fleet to far more than the trace can spend
    fleet_hours = draw(st.floats(0.0005, 0.5))
    spot = [Offer("local", f"local:z{i}", "t", "T4", p, on_demand_usd_per_hour=3 * p) for i, p in enumerate(prices)]
    on_demand = [Offer("local", f"local:z{i}", "t", "T4", 3 * p, on_demand_usd_per_hour=3 * p, market="on-demand")
                 for i, p in enumerate(prices)]
    return {
        "offers": tuple(spot + on_demand),
        "budget": fleet_hours * 3 * max(prices) * (workers + backups),
        "workers": workers,
        "backups": backups,
        "max_hourly": draw(st.none() | st.floats(0.05, 100.0)),
        "egress_share": draw(st.just(0.0) | st.floats(0.0, 1.0)),  # egress USD/h per instance, per USD/h of price
        # a target and deadline make the deadline-aware policies buy on demand at times
        "deadline": draw(st.none() | st.floats(60.0, 3600.0)),
        "ticks": draw(st.lists(st.tuples(st.floats(TICK, late * TICK),  # how late this tick comes
                                         st.floats(0.0, 1.0),  # preemption draw for this tick
                                         st.just(LAG * long_lag) | st.floats(0.0, LAG * long_lag)),  # the drain
                               min_size=20, max_size=300)),
    }


class Fleet:
    """The market's books: every instance's price, start and (once known) end; its traffic costs
    `egress_share` of its price on top."""

    def __init__(self, egress_share: float = 0.0) -> None:
        self.instances: dict[str, dict] = {}  # request id -> {price, location, market, start, end}
        self.rate = 1.0 + egress_share  # the price, and its share in egress

    def cost(self, until: float) -> float:
        return sum(i["price"] * self.rate * (min(until, i["end"] if i["end"] is not None else until) - i["start"])
                   / 3600 for i in self.instances.values())

    def committed(self, now: float, reserve_seconds: float) -> float:
        """What the fleet costs from now on at the least: running ones for the guard's reserve,
        draining ones until their drain ends."""
        return sum(i["price"] * self.rate * ((reserve_seconds if i["end"] is None else max(0.0, i["end"] - now)) / 3600)
                   for i in self.instances.values() if i["end"] is None or i["end"] > now)

    def burn(self, now: float) -> float:
        return sum(i["price"] * self.rate for i in self.instances.values() if i["end"] is None or i["end"] > now)

    def observed(self, now: float, launches: int, samples: float) -> Observed:
        running = tuple(ObservedInstance(r, r, i["location"], i["price"], "running", "training", "T4", 1, i["market"])
                        for r, i in self.instances.items() if i["end"] is None or i["end"] > now)
        return Observed(instances=running, spent_usd=self.cost(now), global_epoch=0, launches=launches,
                        samples=samples, samples_per_second=10.0 * len(running),
                        egress_usd_per_hour=sum(i.price_usd_per_hour for i in running) * (self.rate - 1.0))


def drive(s: dict, policy_name: str, on_tick) -> tuple[Fleet, bool, float]:
    """Run the trace through reconcile(); `on_tick(fleet, now)` checks after each tick's actions.
    Returns the fleet, whether the run ended, and the highest burn seen."""
    guard = BudgetGuard(s["budget"], TICK, LAG, s["max_hourly"])
    policy = get_policy(policy_name)
    fleet, now, launches, samples, ended, top_burn = Fleet(s["egress_share"]), 0.0, 0, 0.0, False, 0.0
    for gap, preempt_draw, lag in s["ticks"]:
        now += gap
        samples += 10.0 * gap * sum(1 for i in fleet.instances.values() if i["end"] is None)
        for i in fleet.instances.values():  # the market takes one worker back now and then
            if i["end"] is None and preempt_draw < 0.1:
                i["end"] = now
                break
        desired = Desired("c", s["workers"], s["backups"], s["offers"], guard, 1, initial_fleet_launched=launches > 0,
                          deadline=s["deadline"], target_samples=1e12 if s["deadline"] else None)
        for action in reconcile(fleet.observed(now, launches, samples), desired, now, policy):
            if isinstance(action, Launch):
                fleet.instances[action.request_id] = {"price": action.offer.spot_usd_per_hour, "start": now,
                                                      "location": action.offer.location,
                                                      "market": action.offer.market, "end": None}
                launches += 1
            elif isinstance(action, Terminate):
                i = fleet.instances[action.request_id]
                i["end"] = now + lag if i["end"] is None else min(i["end"], now + lag)
            elif isinstance(action, EndRun):
                ended = True
        top_burn = max(top_burn, fleet.burn(now))
        on_tick(fleet, now)
        if ended:
            break
    return fleet, ended, top_burn


@pytest.mark.parametrize("policy_name", policy_names())
@PROPERTY
@given(s=scenarios())
def test_spend_and_commitments_stay_within_the_budget_on_every_tick(policy_name, s):
    reserve = 2 * TICK + LAG  # a tick up to one tick late, then the drain

    def check(fleet: Fleet, now: float) -> None:
        spent = fleet.cost(now)
        assert spent <= s["budget"] + EPSILON, f"spent {spent} of {s['budget']} at t={now}"
        owed = spent + fleet.committed(now, reserve)
        assert owed <= s["budget"] + EPSILON, f"spent {spent} and committed to {owed - spent} of {s['budget']}"

    fleet, ended, _ = drive(s, policy_name, check)
    if ended:
        assert fleet.cost(float("inf")) <= s["budget"] + EPSILON
        assert all(i["end"] is not None for i in fleet.instances.values())  # nothing left running


@pytest.mark.parametrize("policy_name", policy_names())
@PROPERTY
@given(s=scenarios(late=4.0, long_lag=3.0))
def test_longer_lags_than_assumed_overrun_by_at_most_the_unforeseen_burn(policy_name, s):
    """Ticks up to 3 ticks late and drains up to 3x the assumed lag: the guard cannot foresee them,
    so the overrun is bounded by the burn over the unforeseen seconds, checked on every tick."""
    unforeseen = (max(g for g, _, _ in s["ticks"]) - 2 * TICK) + max(0.0, max(lag for _, _, lag in s["ticks"]) - LAG)
    top_burn = [0.0]

    def check(fleet: Fleet, now: float) -> None:
        top_burn[0] = max(top_burn[0], fleet.burn(now))
        allowed = s["budget"] + top_burn[0] * max(0.0, unforeseen) / 3600 + EPSILON
        assert fleet.cost(now) <= allowed, f"spent {fleet.cost(now)}, allowed {allowed}"

    fleet, ended, burn = drive(s, policy_name, check)
    if ended:
        assert fleet.cost(float("inf")) <= s["budget"] + burn * max(0.0, unforeseen) / 3600 + EPSILON
