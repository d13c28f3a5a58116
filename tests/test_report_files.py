"""`spotrain report --run N --csv DIR --html FILE` on a ledger filled through the real ledger API:
the CSV files hold the ledger's rows, the page holds four inline plots that draw their data (in
Chromium, which tells them from empty ones) and fetches nothing, the headline compares with
on-demand prices and with the plan the run was launched with, and an unknown run is one line."""

import csv
import json
import re
import time
from xml.etree import ElementTree

import pytest
from conftest import run_cli
from report_page import plot_boxes, require_chromium, undrawn

from spotrain.config import ClusterSpec
from spotrain.egress import UNKNOWN, EgressReading
from spotrain.ledger import Ledger
from spotrain.plan import plan_meta_key

SPEC = ClusterSpec.model_validate({"name": "rep", "budget": {"total_usd": 1.0}}).model_dump(mode="json")
SVG = "{http://www.w3.org/2000/svg}"
ON_DEMAND = {"local:zone-a": 3.06, "local:zone-b": 0.526}  # p3.2xlarge and g4dn.xlarge, us-east-1


def metric(instance_id: str, samples: int, loss: float, state: str = "training") -> dict:
    return {"instance_id": instance_id, "state": state, "epoch": samples // 100, "samples": samples,
            "samples_per_second": 10.0, "loss": loss, "bytes_sent": samples * 4, "bytes_received": samples * 3,
            "checkpoint_epoch": None}


def egress(minute: int) -> list[EgressReading]:
    """i-b's counter towards i-a while i-a lives, and i-c's towards a peer no record names."""
    readings = [EgressReading("i-c", 0.0, "peer-x", "local:zone-b", UNKNOWN, 5_000_000 * minute, 0.09)]
    if minute < 4:
        readings.append(EgressReading("i-b", 0.0, "peer-a", "local:zone-b", "local:zone-a", 100_000_000 * minute, 0.02))
    return readings if minute < 7 else []


def fill(ledger: Ledger, t0: float) -> None:
    """Run 1: three workers over 10 minutes, one preempted after a notice and one without, tensors
    sent between zones; run 2 starts."""
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
        ledger.charge(run.id, now, egress(minute))
        live = [("i-a", minute < 4), ("i-b", True), ("i-c", minute < 7)]
        ledger.record_metrics(run.id, now, [metric(i, 600 * minute, 3.0 - 0.2 * minute) for i, up in live if up])
    ledger.mark_ended("rep-r00001", "terminated", t0 + 600, "terminated by request", run.id)
    ledger.end_run(run.id, "duration reached", t0 + 600)
    ledger.open_run(1.0, SPEC, t0 + 700)


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def as_text(ledger_rows, columns: list[str]) -> list[dict]:
    """Ledger rows as a CSV file must read back: every column, in order, None as empty."""
    return [{column: "" if row[column] is None else str(row[column]) for column in columns} for row in ledger_rows]


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
    metrics_columns = ["t", "instance_id", "state", "epoch", "samples", "samples_per_second", "loss",
                       "bytes_sent", "bytes_received", "checkpoint_epoch"]
    assert as_text(ledger.metrics(1), metrics_columns) == rows(tmp_path / "csv" / "metrics.csv")
    egress_columns = ["t", "instance_id", "peer", "source", "destination", "bytes", "usd_per_gb", "usd"]
    assert len(ledger.egress_intervals(1)) == 3 + 6  # i-b's three minutes, i-c's six
    assert as_text(ledger.egress_intervals(1), egress_columns) == rows(tmp_path / "csv" / "egress.csv")
    assert [r["kind"] for r in rows(tmp_path / "csv" / "events.csv")] == [e["kind"] for e in ledger.events(1)]
    locations = {r["location"]: r for r in rows(tmp_path / "csv" / "locations.csv")}
    # instance time by location; egress (in egress.csv, by path) makes up the rest of the spend
    assert ledger.egress_spent(1) == pytest.approx(sum(float(r["usd"]) for r in rows(tmp_path / "csv" / "egress.csv")))
    assert sum(float(r["usd"]) for r in locations.values()) + ledger.egress_spent(1) == pytest.approx(ledger.spent(1))
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
    plots = dict(re.findall(r'<figure class="plot" data-plot="(\w+)">(<svg.*?</svg>)</figure>', text, flags=re.DOTALL))
    assert list(plots) == ["spend", "fleet", "progress", "cost"]
    fleet = plots["fleet"]
    assert all(f"i-{name}" in fleet for name in "abc")
    assert [drawn(fleet, f"data-fleet-bar-{row}") for row in range(3)] == ["path"] * 3
    # the markers themselves (the legend shows both kinds whatever happened): i-a's notice, i-c's none
    assert drawn(fleet, "data-fleet-preempted-0") == drawn(fleet, "data-fleet-preempted-without-notice-2") == "use"
    assert "data-fleet-preempted-without-notice-0" not in fleet and "data-fleet-preempted-1" not in fleet
    assert "local:zone-a" in plots["cost"] and drawn(plots["cost"], "data-cost-on-demand-0") == "path"
    assert drawn(plots["spend"], "data-spend") == drawn(plots["progress"], "data-progress-loss") == "path"
    assert f"(saved {data['savings_fraction']:.0%})" in text
    assert 0.64 < data["savings_fraction"] < 0.70  # spot paid 30% (zone-a) and 36% (zone-b) of on-demand
    for external in ("<script", "<link", "<img", 'src="', "url(http", 'href="http'):
        assert external not in text  # one file, nothing fetched to view it


def drawn(svg: str, gid: str) -> str | None:
    """What the group with this id draws: "path" or "use" (a marker placed), outside its <defs>; None
    for a group that draws nothing or is missing."""
    group = ElementTree.fromstring(svg).find(f".//*[@id='{gid}']")
    if group is None:
        return None
    definitions = {id(e) for d in group.iter(f"{SVG}defs") for e in d.iter()}
    tags = {e.tag.removeprefix(SVG) for e in group.iter() if id(e) not in definitions}
    return "use" if "use" in tags else "path" if "path" in tags else None


def test_a_plot_without_data_is_told_from_a_drawn_one_in_chromium(cluster, tmp_path):
    """The page probe the end-to-end test relies on: run 1's plots draw, run 2 (no instance, no
    sample, no charge) shows axes, legends and notes only, and the probe finds every plot empty."""
    require_chromium()
    home, _ = cluster
    pages = {number: tmp_path / f"run{number}.html" for number in (1, 2)}
    for number, page in pages.items():
        run_cli("report", "--run", str(number), "--html", str(page), home=home, check=True, timeout=120)
    drawn_plots = plot_boxes(pages[1], tmp_path)
    assert [plot["plot"] for plot in drawn_plots] == ["spend", "fleet", "progress", "cost"]
    assert undrawn(drawn_plots) == [], drawn_plots
    empty = plot_boxes(pages[2], tmp_path)
    assert undrawn(empty) == ["spend", "fleet", "progress", "cost"], empty
    assert "no instance recorded" in pages[2].read_text()


def test_the_headline_compares_the_run_with_its_recorded_plan(cluster, tmp_path):
    home, ledger = cluster
    old = json.loads(run_cli("report", "--run", "1", "--json", home=home, check=True, timeout=120).stdout)
    assert old["planned"] is None  # a ledger from before plans were recorded still reports
    terminal = run_cli("report", "--run", "1", home=home, check=True, timeout=120).stdout
    assert f"not recorded -> {old['samples_per_second']:.1f}" in terminal
    ledger.set_meta(plan_meta_key(1), {"samples_per_second": 40.0, "cost_per_million_samples_usd": 1.25,
                                       "usd_per_hour": 1.3})
    data = json.loads(run_cli("report", "--run", "1", "--json", "--html", str(tmp_path / "r.html"), home=home,
                              check=True, timeout=120).stdout)
    assert data["planned"] == {"samples_per_second": 40.0, "cost_per_million_samples_usd": 1.25, "usd_per_hour": 1.3}
    assert data["samples_per_second"] == pytest.approx((1800 + 6000 + 3600) / 540)  # i-a, i-b, i-c; metrics span 540 s
    share = f"{data['samples_per_second'] / 40:.0%}"
    terminal = run_cli("report", "--run", "1", home=home, check=True, timeout=120).stdout
    assert f"40.0 -> {data['samples_per_second']:.1f} ({share} of plan)" in terminal
    assert f"$1.25 -> ${data['cost_per_million_samples_usd']:.2f}" in terminal
    page = (tmp_path / "r.html").read_text()
    assert (f"<tr><th>Samples/s planned \u2192 actual</th><td>40.0 \u2192 {data['samples_per_second']:.1f} "
            f"({share} of plan)</td></tr>") in page
    ledger.set_meta(plan_meta_key(1), {"samples_per_second": "fast"})
    bad = run_cli("report", "--run", "1", home=home, timeout=120)
    assert bad.returncode != 0 and bad.stderr == (
        f"spotrain: error: ledger meta {plan_meta_key(1)}: samples_per_second is 'fast', not a number\n")


def test_an_unknown_run_is_one_line(cluster):
    home, _ = cluster
    result = run_cli("report", "--run", "5", home=home, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "spotrain: error: --run: cluster 'rep' has no run 5 (its runs: 1, 2)\n"
    latest = json.loads(run_cli("report", "--json", home=home, check=True, timeout=120).stdout)
    assert latest["run"] == 2 and latest["state"] == "running"
