"""Property: spend never exceeds the budget, whatever the prices, preemptions and tick jitter.

The same reconcile() and BudgetGuard as a real run are driven over random traces; the money is
the exact integral of price over instance lifetime, including the drain after termination, plus
the egress each instance's traffic costs meanwhile (a share of its price, seen by the guard as the
fleet's egress burn).
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from spotrain.budget import BudgetGuard
from spotrain.controller import Desired, EndRun, Launch, Observed, ObservedInstance, Terminate, reconcile
from spotrain.policies.spread import SpreadCheapest
from spotrain.providers.base import Offer

TICK = 2.0
LAG = 13.0


@st.composite
def scenarios(draw):
    prices = draw(st.lists(st.floats(0.01, 40.0), min_size=1, max_size=4))
    workers, backups = draw(st.integers(1, 6)), draw(st.integers(0, 2))
    # budgets from a few ticks of the fleet to far more than the trace can spend
    fleet_hours = draw(st.floats(0.0005, 0.5))
    return {
        "offers": tuple(Offer("local", f"local:z{i}", "t", None, p) for i, p in enumerate(prices)),
        "budget": fleet_hours * max(prices) * (workers + backups),
        "workers": workers,
        "backups": backups,
        "max_hourly": draw(st.none() | st.floats(0.05, 100.0)),
        "egress_share": draw(st.just(0.0) | st.floats(0.0, 1.0)),  # egress USD/h per instance, per USD/h of price
        "ticks": draw(st.lists(st.tuples(st.floats(TICK, 2 * TICK),  # a tick may come late, up to 2x
                                         st.floats(0.0, 1.0),  # preemption draw for this tick
                                         st.just(LAG) | st.floats(0.0, LAG)),  # how long termination takes
                               min_size=20, max_size=600)),
    }


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_spend_never_exceeds_budget(s):
    guard = BudgetGuard(s["budget"], TICK, LAG, s["max_hourly"])
    fleet: dict[str, dict] = {}  # request id -> {price, location, start, end}
    now, launches, ended = 0.0, 0, False

    def cost(until: float) -> float:
        rate = 1 + s["egress_share"]  # the price, and its share in egress
        return sum(i["price"] * rate * (min(until, i["end"] if i["end"] is not None else until) - i["start"]) / 3600
                   for i in fleet.values())

    for gap, preempt_draw, lag in s["ticks"]:
        now += gap
        for i in fleet.values():  # the market takes one worker back now and then
            if i["end"] is None and preempt_draw < 0.1:
                i["end"] = now
                break
        live = {r: i for r, i in fleet.items() if i["end"] is None or i["end"] > now}
        observed = Observed(
            instances=tuple(ObservedInstance(r, r, i["location"], i["price"], "running", "training")
                            for r, i in live.items()),
            spent_usd=cost(now), global_epoch=0, launches=launches,
            egress_usd_per_hour=sum(i["price"] for i in live.values()) * s["egress_share"])
        desired = Desired("c", s["workers"], s["backups"], s["offers"], guard, 1, initial_fleet_launched=launches > 0)
        for action in reconcile(observed, desired, now, SpreadCheapest()):
            if isinstance(action, Launch):
                fleet[action.request_id] = {"price": action.offer.spot_usd_per_hour, "location": action.offer.location,
                                            "start": now, "end": None}
                launches += 1
            elif isinstance(action, Terminate):
                i = fleet[action.request_id]
                i["end"] = now + lag if i["end"] is None else min(i["end"], now + lag)
            elif isinstance(action, EndRun):
                ended = True
        if ended:
            break
    if not ended:
        return  # the trace ran out first; the budget held at every tick so far
    final = cost(float("inf"))
    assert final <= s["budget"] + 1e-12, f"spent {final} of {s['budget']}"
    assert all(i["end"] is not None for i in fleet.values())  # nothing left running
