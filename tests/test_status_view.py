"""`spotrain status` on ledgers filled through the real ledger API: burn rate, time left, the
budget's horizon and checkpoint duty while a run goes on; how it ended afterwards (also under
`--watch`, which then stops); a list when there are several clusters and none is named."""

import json
import time

import pytest
from conftest import run_cli

from spotrain.config import ClusterSpec
from spotrain.ledger import Ledger


def cluster(home, name: str, ended: bool) -> None:
    spec = ClusterSpec.model_validate({"name": name, "budget": {"total_usd": 1.0}}).model_dump(mode="json")
    ledger = Ledger.create(home / "clusters" / name / "ledger.db")
    t0 = time.time() - 300
    run = ledger.open_run(1.0, spec, t0)
    ledger.set_meta(f"run-{run.id}-end-at", t0 + 900)
    for n, (instance, price) in enumerate((("i-a", 0.92), ("i-b", 0.19))):
        ledger.record_request(run.id, f"{name}-r{n:05d}", "local", f"local:zone-{'ab'[n]}", price, t0)
        ledger.mark_running(f"{name}-r{n:05d}", instance, t0 + 5)
    ledger.event(run.id, "duty", t0 + 30, "i-b")
    ledger.charge(run.id, t0 + 290)
    ledger.record_metrics(run.id, t0 + 290, [
        {"instance_id": "i-a", "state": "training", "epoch": 3, "samples": 900, "samples_per_second": 4.0,
         "loss": 2.0, "bytes_sent": 0, "bytes_received": 0},
        {"instance_id": "i-b", "state": "starting", "epoch": 0, "samples": 0, "samples_per_second": 0.0,
         "loss": None, "bytes_sent": 0, "bytes_received": 0}])
    if ended:
        for n in range(2):
            ledger.mark_ended(f"{name}-r{n:05d}", "terminated", t0 + 295, "terminated by request", run.id)
        ledger.end_run(run.id, "duration reached", t0 + 295)
    ledger.close()


def test_a_running_cluster_shows_burn_time_left_and_duty(tmp_path):
    home = tmp_path / "home"
    cluster(home, "live", ended=False)
    data = json.loads(run_cli("status", "--json", home=home, check=True, timeout=120).stdout)
    assert data["burn_usd_per_hour"] == pytest.approx(1.11)
    assert data["budget_runs_out_in_seconds"] == pytest.approx((1.0 - data["spent_usd"]) / 1.11 * 3600)
    assert 550 < data["remaining_seconds"] <= 600 and 295 < data["elapsed_seconds"] < 360
    assert data["duty"] == ["i-b"] and data["samples_per_second"] == 4.0  # only agents that train
    text = run_cli("status", "live", home=home, check=True, timeout=120).stdout
    assert "burn $1.110/h, the budget lasts" in text and "ends in " in text
    assert [line.split()[9] for line in text.splitlines() if "i-b" in line] == ["yes"]  # the duty column
    assert "newest checkpoint none yet" in text


def test_an_ended_run_says_how_and_watch_stops(tmp_path):
    home = tmp_path / "home"
    cluster(home, "done", ended=True)
    for args in (("status",), ("status", "--watch")):
        result = run_cli(*args, home=home, check=True, timeout=120)
        assert result.stdout.strip().endswith("ended: duration reached; see `spotrain report done`")
        assert "instance" not in result.stdout  # no empty table
    result = run_cli("status", "--watch", "--json", home=home, timeout=120)
    assert result.returncode == 2 and result.stderr == "spotrain: error: --watch and --json: choose one\n"


def test_several_clusters_and_no_name_list_them(tmp_path):
    home = tmp_path / "home"
    cluster(home, "one", ended=True)
    cluster(home, "two", ended=False)
    rows = json.loads(run_cli("status", "--json", home=home, check=True, timeout=120).stdout)
    assert [(r["cluster"], r["state"], r["end_reason"]) for r in rows] == [
        ("one", "ended", "duration reached"), ("two", "running", None)]
    text = run_cli("status", home=home, check=True, timeout=120).stdout
    assert "ended: duration reached" in text and "two" in text
    assert json.loads(run_cli("status", "two", "--json", home=home, check=True, timeout=120).stdout)["run"] == 1
