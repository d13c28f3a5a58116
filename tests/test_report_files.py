"""`spotrain report --run N --csv DIR --html FILE` on a ledger filled through the real ledger API:
the CSV files hold the ledger's rows, the page holds four non-empty inline plots and fetches
nothing, the headline compares with on-demand prices, and an unknown run is one line."""

import csv
import json
import re
import time

import pytest
from conftest import run_cli

from spotrain.config import ClusterSpec
from spotrain.ledger import Ledger

SPEC = ClusterSpec.model_validate({"name": "rep", "budget": {"total_usd": 1.0}}).model_dump(mode="json")
ON_DEMAND = {"local:zone-a": 3.06, "local:zone-b": 0.526}  # p3.2xlarge and g4dn.xlarge, us-east-1


def metric(instance_id: str, samples: int, loss: float, state: str = "training") -> dict:
    return {"instance_id": instance_id, "state": state, "epoch": samples // 100, "samples": samples,
            "samples_per_second": 10.0, "loss": loss, "bytes_sent": samples * 4, "bytes_received": samples * 3,
            "checkpoint_epoch": None}


def fill(ledger: Ledger, t0: float) -> None:
    """Run 1: three workers over 10 minutes, one preempted after a notice and one without; run 2 starts."""
    run = ledger.open_run(1.0, SPEC, t0)
    fleet = [("rep-r00000", "i-a", "local:zone-a", 0.92), ("rep-r00001", "i-b", "local:zone-b", 0.19),
             ("rep-r00002", "i-c", "local:zone-b", 0.19)]
    for request, instance, location, price in fleet:
        ledger.record_request(run.id, request, "local", location, price, t0, instance_type="local.cpu")
        ledger.mark_running(request, instance, t0 + 5)
    for minute in range(1, 11):
        now = t0 + 60 * minute
        if minute == 4:
            ledger.mark_ended("rep-r00000", "preempted", now, "spot preemption", run.id)
        if minute == 7:
            ledger.mark_ended("rep-r00002", "preempted", now, "spot preemption without notice", run.id)
        ledger.charge(run.id, now)
        live = [("i-a", minute < 4), ("i-b", True), ("i-c", minute < 7)]
        ledger.record_metrics(run.id, now, [metric(i, 600 * minute, 3.0 - 0.2 * minute) for i, up in live if up])
    ledger.mark_ended("rep-r00001", "terminated", t0 + 600, "terminated by request", run.id)
    ledger.end_run(run.id, "duration reached", t0 + 600)
    ledger.open_run(1.0, SPEC, t0 + 700)


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def cluster(tmp_path):
    home = tmp_path / "home"
    ledger = Ledger.create(home / "clusters" / "rep" / "ledger.db")
    fill(ledger, time.time() - 3600)
    yield home, ledger
    ledger.close()


def test_csv_files_hold_the_runs_ledger(cluster, tmp_path):
    home, ledger = cluster
    result = run_cli("report", "--run", "1", "--csv", str(tmp_path / "csv"), "--json", home=home, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"] == 1  # stdout stays one JSON object; "wrote ..." goes to stderr
    spend = rows(tmp_path / "csv" / "spend.csv")
    assert [(r["request_id"], float(r["usd"])) for r in spend] == [
        (s["request_id"], s["usd"]) for s in ledger.spend_intervals(1)]
    instances = rows(tmp_path / "csv" / "instances.csv")
    assert [(r["instance_id"], r["state"], r["end_reason"]) for r in instances] == [
        (i.instance_id, i.state, i.end_reason) for i in ledger.instances(run_id=1)]
    assert len(rows(tmp_path / "csv" / "metrics.csv")) == len(ledger.metrics(1))
    assert [r["kind"] for r in rows(tmp_path / "csv" / "events.csv")] == [e["kind"] for e in ledger.events(1)]
    locations = {r["location"]: r for r in rows(tmp_path / "csv" / "locations.csv")}
    assert sum(float(r["usd"]) for r in locations.values()) == pytest.approx(ledger.spent(1))
    assert int(locations["local:zone-b"]["samples"]) == 6000 + 3600  # i-b's last count plus i-c's
    for location, entry in locations.items():
        assert float(entry["on_demand_usd"]) == pytest.approx(ON_DEMAND[location] * float(entry["seconds"]) / 3600)


def test_the_html_page_has_four_plots_and_the_headline(cluster, tmp_path):
    home, _ = cluster
    page = tmp_path / "report.html"
    result = run_cli("report", "rep", "--run", "1", "--html", str(page), "--json", home=home, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["duration_seconds"] == pytest.approx(600) and data["end_reason"] == "duration reached"
    assert data["savings_fraction"] == pytest.approx(1 - data["spent_usd"] / data["on_demand_usd"])
    text = page.read_text()
    plots = re.findall(r'<figure class="plot">(<svg.*?</svg>)</figure>', text, flags=re.DOTALL)
    assert len(plots) == 4 and all(svg.count("<path") > 5 for svg in plots)
    _, fleet, _, cost = plots
    assert all(f"i-{name}" in fleet for name in "abc")
    assert "preempted without notice" in fleet and "local:zone-a" in cost
    assert f"(saved {data['savings_fraction']:.0%})" in text
    assert 0.64 < data["savings_fraction"] < 0.70  # spot paid 30% (zone-a) and 36% (zone-b) of on-demand
    for external in ("<script", "<link", "<img", 'src="', "url(http", 'href="http'):
        assert external not in text  # one file, nothing fetched to view it


def test_an_unknown_run_is_one_line(cluster):
    home, _ = cluster
    result = run_cli("report", "--run", "5", home=home, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "spotrain: error: --run: cluster 'rep' has no run 5 (its runs: 1, 2)\n"
    latest = json.loads(run_cli("report", "--json", home=home, check=True, timeout=120).stdout)
    assert latest["run"] == 2 and latest["state"] == "running"
