"""Egress: counted per destination on the agent's send path, priced per path, charged in the ledger
with instance time, reserved for by the budget guard."""

import multiprocessing
import time
from dataclasses import replace

import pytest

from spotrain.agents.egress import OTHER, PeerBytes
from spotrain.budget import BudgetGuard
from spotrain.config import ClusterSpec
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.controller import Desired, EndRun, Observed, ObservedInstance, reconcile
from spotrain.egress import UNKNOWN, egress_readings
from spotrain.ledger import Ledger
from spotrain.policies.spread import SpreadCheapest
from spotrain.providers.base import Instance, Offer

AWS, GCP = "aws:us-east-1a", "gcp:europe-west4-a"
PEER_A, PEER_B, STRANGER = "12D3KooWAaaa", "12D3KooWBbbb", "12D3KooWZzzz"


def _add_in_child(counter: PeerBytes) -> None:
    counter.add(PEER_B, 500)
    counter.add(PEER_A, 7)


def test_counters_are_per_destination_and_shared_with_forked_processes():
    counter = PeerBytes(slots=2)
    counter.add(PEER_A, 100)
    child = multiprocessing.get_context("fork").Process(target=_add_in_child, args=(counter,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    counter.add(STRANGER, 3)  # past the two slots: counted, under OTHER
    counter.add(PEER_B, 0)
    assert counter.snapshot() == {PEER_A: 107, PEER_B: 500, OTHER: 3}


def status(instance_id: str, peer: str, egress: dict[str, int], since: float = 1.0) -> AgentStatus:
    return AgentStatus(instance_id, AgentState.TRAINING, epoch=1, samples=10, samples_per_second=1.0, loss=None,
                       bytes_sent=sum(egress.values()), bytes_received=0, checkpoint_epoch=None,
                       addresses=(f"/ip4/198.18.0.1/tcp/31337/p2p/{peer}",), time=time.time(),
                       egress_bytes=egress, egress_since=since)


@pytest.mark.parametrize("egress", [{"p": -1}, {"p": 1.5}, {"": 1}, {"p" * 65: 1},
                                    {f"p{i}": 1 for i in range(257)}, ["p", 1]])
def test_a_record_with_malformed_counters_is_refused(egress):
    record = status("i-a", PEER_A, {}).to_record()
    assert AgentStatus.from_record(record) is not None
    assert AgentStatus.from_record(dict(record, egress_bytes=egress)) is None


def test_a_record_of_an_agent_that_counts_no_egress_still_parses():
    record = status("i-a", PEER_A, {PEER_B: 5}).to_record()
    del record["egress_bytes"], record["egress_since"]
    assert AgentStatus.from_record(record).egress_bytes == {}


class TwoClouds:
    """A provider in memory with one zone on AWS and one on GCP, whose egress prices differ."""

    name, termination_lag_seconds = "two-clouds", 0.0

    def __init__(self):
        self.instances: dict[str, Instance] = {}

    def offers(self):
        return [Offer("aws", AWS, "g4dn.xlarge", None, 0.5), Offer("gcp", GCP, "g2-standard-4", None, 0.3)]

    def launch(self, request):
        instance = Instance(f"i-{request.offer.provider}", request.request_id, request.cluster, request.offer.location,
                            request.offer.spot_usd_per_hour, InstanceState.RUNNING, 0.0)
        self.instances[request.request_id] = instance
        return instance

    def list_instances(self, cluster):
        return list(self.instances.values())

    def terminate(self, instance_id):
        for request_id, i in self.instances.items():
            if i.instance_id == instance_id:
                self.instances[request_id] = replace(i, state=InstanceState.TERMINATED, ended_at=1.0)


class ReportingSwarm:
    def __init__(self):
        self.records: dict[str, AgentStatus] = {}

    def statuses(self):
        return dict(self.records)

    def addresses(self):
        return []

    def assign_duty(self, ids):
        pass


@pytest.fixture
def loop(tmp_path):
    spec = ClusterSpec.model_validate({"name": "c", "budget": {"total_usd": 100.0},
                                       "placement": {"workers": 2, "backups": 0, "locations": [AWS, GCP]}})
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(100.0, spec.model_dump(mode="json"), now=0.0)
    clock = [0.0]
    loop = ControlLoop(spec, ledger, run, TwoClouds(), ReportingSwarm(), LoopSettings(), say=lambda _: None,
                       clock=lambda: clock[0], policy=SpreadCheapest())
    loop.tick()
    assert {row.location for row in ledger.instances(states=(InstanceState.RUNNING,))} == {AWS, GCP}
    yield loop, clock
    ledger.close()


def test_egress_is_charged_bytes_times_the_paths_price_with_instance_time(loop):
    loop, clock = loop
    swarm, ledger, run = loop.swarm, loop.ledger, loop.run
    swarm.records = {"i-aws": status("i-aws", PEER_A, {PEER_B: 3_000_000_000}),
                     "i-gcp": status("i-gcp", PEER_B, {PEER_A: 1_000_000_000, STRANGER: 500_000_000})}
    clock[0] = 10.0
    loop.tick()
    # AWS us-east-1 to another cloud $0.09/GB, GCP to another cloud $0.12/GB (market.py); the
    # stranger is priced as GCP's dearest path, the internet
    expected = {(AWS, GCP): (3.0, 0.27), (GCP, AWS): (1.0, 0.12), (GCP, UNKNOWN): (0.5, 0.06)}
    paths = {(p["source"], p["destination"]): (p["gb"], p["usd"]) for p in ledger.egress_by_path(run.id)}
    assert paths.keys() == expected.keys()
    for path, (gb, usd) in expected.items():
        assert paths[path][0] == pytest.approx(gb, rel=1e-9) and paths[path][1] == pytest.approx(usd, rel=0.01)
    instance_time = sum(r["usd"] for r in ledger.spend_intervals(run.id))
    assert instance_time == pytest.approx((0.5 + 0.3) * 10 / 3600)
    assert ledger.spent(run.id) == pytest.approx(instance_time + 0.45)
    # the egress of a tick is written with that tick's instance time, at the same moment
    assert {row["t"] for row in ledger.egress_intervals(run.id)} == {10.0}
    assert max(r["t_end"] for r in ledger.spend_intervals(run.id)) == 10.0

    clock[0] = 12.0
    loop.tick()  # the same records again: nothing more
    assert ledger.egress_spent(run.id) == pytest.approx(0.45)
    swarm.records["i-aws"] = status("i-aws", PEER_A, {PEER_B: 4_000_000_000})  # grew by 1 GB
    swarm.records["i-gcp"] = status("i-gcp", PEER_B, {PEER_A: 200_000_000}, since=2.0)  # a restarted agent
    clock[0] = 14.0
    loop.tick()
    assert ledger.egress_spent(run.id) == pytest.approx(0.45 + 0.09 + 0.2 * 0.12)


def test_a_restarted_controller_charges_no_counter_twice(loop, tmp_path):
    loop, clock = loop
    loop.swarm.records = {"i-aws": status("i-aws", PEER_A, {PEER_B: 2_000_000_000})}
    clock[0] = 4.0
    loop.tick()
    reopened = Ledger.open_existing(tmp_path / "ledger.db")
    again = ControlLoop(loop.spec, reopened, reopened.current_run(), loop.provider, loop.swarm, LoopSettings(),
                        say=lambda _: None, clock=lambda: 6.0, policy=SpreadCheapest())
    again.tick()
    assert reopened.egress_spent(loop.run.id) == pytest.approx(2 * 0.09)
    reopened.close()


def test_counters_of_an_instance_the_ledger_does_not_know_are_not_charged():
    readings = egress_readings([status("i-x", PEER_A, {PEER_B: 10}), status("i-b", PEER_B, {PEER_A: 10})],
                               {"i-b": GCP})
    assert [(r.instance_id, r.destination) for r in readings] == [("i-b", UNKNOWN)]


def test_the_budget_guard_counts_egress_in_the_fleets_burn():
    guard = BudgetGuard(total_usd=1.0, tick_seconds=2.0, termination_lag_seconds=10.0)
    fleet = (ObservedInstance("c-r0", "i-0", AWS, 0.5, InstanceState.RUNNING, AgentState.TRAINING),)
    desired = Desired("c", 1, 0, (Offer("aws", AWS, "t", None, 0.5),), guard, 1, initial_fleet_launched=True)
    quiet = Observed(instances=fleet, spent_usd=0.95, global_epoch=1, launches=1)
    assert not any(isinstance(a, EndRun) for a in reconcile(quiet, desired, 100.0, SpreadCheapest()))
    # $0.95 spent; an egress burn of $20/h costs more than the $0.05 left over a late tick and the drain
    busy = replace(quiet, egress_usd_per_hour=20.0)
    assert [a for a in reconcile(busy, desired, 100.0, SpreadCheapest()) if isinstance(a, EndRun)] \
        == [EndRun("budget nearly spent")]


def test_two_real_averagers_meter_what_they_send_each_other_and_the_ledger_charges_it(tmp_path):
    """The hook on hivemind's own send path: averaging both ways, then a state download served."""
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager

    from spotrain.agents import egress
    from spotrain.kernels import get_codec

    egress.install()
    numel = 300_000
    dht_a = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht_b = hivemind.DHT(initial_peers=dht_a.get_visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    a_id, b_id = str(dht_a.peer_id), str(dht_b.peer_id)
    averagers = [DecentralizedAverager([torch.full((numel,), float(i))], dht, prefix="egress-test",
                                       target_group_size=2, min_group_size=2, min_matchmaking_time=2.0,
                                       request_timeout=1.0, compression=get_codec("none"), start=True)
                 for i, dht in enumerate((dht_a, dht_b))]
    try:
        before = egress.sent_to.snapshot()
        steps = [averager.step(wait=False, timeout=60) for averager in averagers]
        assert all(step.result(timeout=90) for step in steps)
        with averagers[1].get_tensors() as (averaged,):
            assert torch.allclose(averaged, torch.full((numel,), 0.5))
        averaged_counts = egress.sent_to.snapshot()
        # each peer sends the half the other averages and returns the averaged half it took: 4 bytes a value
        for peer in (a_id, b_id):
            sent = averaged_counts[peer] - before.get(peer, 0)
            assert 4 * numel <= sent <= 4 * numel * 1.01, (peer, sent)
        averagers[1].load_state_from_peers(timeout=30)  # a serves b its state: the whole tensor
        served = egress.sent_to.snapshot()[b_id] - averaged_counts[b_id]
        assert 4 * numel <= served <= 4 * numel * 1.01
    finally:
        for averager in averagers:
            averager.shutdown()
        dht_b.shutdown()
        dht_a.shutdown()
    counts = egress.sent_to.snapshot()
    statuses = [status("i-a", a_id, {b_id: counts[b_id]}), status("i-b", b_id, {a_id: counts[a_id]})]
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(10.0, {}, now=0.0)
    ledger.charge(run.id, 1.0, egress=egress_readings(statuses, {"i-a": AWS, "i-b": GCP}))
    charged = {(p["source"], p["destination"]): p["usd"] for p in ledger.egress_by_path(run.id)}
    assert charged[(AWS, GCP)] == pytest.approx(counts[b_id] / 1e9 * 0.09, rel=0.01)
    assert charged[(GCP, AWS)] == pytest.approx(counts[a_id] / 1e9 * 0.12, rel=0.01)
    ledger.close()


def test_report_status_csv_and_html_show_egress_by_path(loop, tmp_path):
    from rich.console import Console

    from spotrain.report import build_report, print_report
    from spotrain.report_csv import write_csv
    from spotrain.report_data import series
    from spotrain.report_html import render
    from spotrain.status_view import live_figures

    loop, clock = loop
    loop.swarm.records = {"i-gcp": status("i-gcp", PEER_B, {})}
    loop.tick()  # the controller learns where PEER_B is; its record may expire later
    loop.swarm.records = {"i-aws": status("i-aws", PEER_A, {PEER_B: 2_000_000_000})}
    clock[0] = 30.0
    loop.tick()
    report = build_report(loop.ledger, loop.run, "c")
    assert report["egress_usd"] == pytest.approx(0.18)
    assert report["egress_by_path"] == [{"source": AWS, "destination": GCP, "gb": 2.0, "usd": pytest.approx(0.18)}]
    assert report["spent_usd"] == pytest.approx(0.18 + 0.8 * 30 / 3600)
    console = Console(record=True, width=120)
    print_report(report, console)
    text = console.export_text()
    assert "egress by path" in text and "$0.1800" in text
    written = {path.name: path for path in write_csv(loop.ledger, loop.run, tmp_path / "csv")}
    assert "aws:us-east-1a,gcp:europe-west4-a,2000000000" in written["egress.csv"].read_text()
    page = render(report, series(loop.ledger, loop.run, now=30.0))
    assert "Egress by path" in page and "$0.1800" in page
    figures = live_figures(loop.ledger, loop.run, report, [], now=31.0)
    # $0.18 charged at t=30, the first egress charge: its burn is over the tick before it
    assert figures["egress_usd_per_hour"] == pytest.approx(0.18 / 3.0 * 3600)
    assert figures["egress_by_path"] == report["egress_by_path"]


def test_the_emulated_cloud_prices_its_paths_as_the_catalog_regions_it_names():
    from spotrain.config import ClusterSpec
    from spotrain.egress import UNKNOWN, emulated_cloud_prices, path_usd_per_gb

    spec = ClusterSpec.model_validate({
        "name": "geo", "budget": {"total_usd": 1.0},
        "providers": {"local": {"regions": {"usa": {"egress_priced_as": "aws:us-east-1"},
                                            "eur": {"egress_priced_as": "aws:eu-west-1"}, "free": {}},
                                "locations": {"us-a": {"price_usd_per_hour": 0.2, "region": "usa"},
                                              "us-b": {"price_usd_per_hour": 0.2, "region": "usa"},
                                              "eu-a": {"price_usd_per_hour": 0.2, "region": "eur"},
                                              "x-a": {"price_usd_per_hour": 0.2, "region": "free"}}}}})
    priced = spec.providers.egress_priced_as()
    assert priced == {"local:us-a": "aws:us-east-1", "local:us-b": "aws:us-east-1", "local:eu-a": "aws:eu-west-1"}
    price = emulated_cloud_prices(priced)
    between = path_usd_per_gb("aws:us-east-1", "aws:eu-west-1")
    assert between > 0 and price("local:us-a", "local:eu-a") == between
    assert price("local:us-a", "local:us-b") == 0.0  # one region: the same catalog region, free
    assert price("local:x-a", "local:us-a") == 0.0  # a region that names no catalog region sends for free
    assert price("local:eu-a", UNKNOWN) >= path_usd_per_gb("aws:eu-west-1", "aws:us-east-1")
