"""`spotrain status` on ledgers filled through the real ledger API: burn rate, time left, the
budget's horizon and checkpoint duty while a controller drives a run, and no countdown once none
does; roles (worker, backup) and a line per location; a table that fits 80 columns without cutting
a cell short; how a run ended afterwards (also under `--watch`, which then stops); and, without a
name, always the list of clusters."""

import io
import json
import time

import pytest
from conftest import run_cli
from rich.console import Console

from spotrain.config import ClusterSpec
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.controller_process import controller_lock
from spotrain.ledger import Ledger
from spotrain.status_fleet import workers_of
from spotrain.status_view import render


def cluster(home, name: str, ended: bool, locations: tuple[str, str] = ("local:zone-a", "local:zone-b"),
            ids: tuple[str, str] = ("i-a", "i-b")) -> None:
    """A run of one worker and one backup (the spec asks for 1 + 1), the backup holding duty."""
    spec = ClusterSpec.model_validate({"name": name, "budget": {"total_usd": 1.0},
                                       "placement": {"workers": 1, "backups": 1}}).model_dump(mode="json")
    ledger = Ledger.create(home / "clusters" / name / "ledger.db")
    t0 = time.time() - 300
    run = ledger.open_run(1.0, spec, t0)
    ledger.set_meta(f"run-{run.id}-end-at", t0 + 900)
    for n, (instance, price) in enumerate(zip(ids, (0.92, 0.19))):
        ledger.record_request(run.id, f"{name}-r{n:05d}", "local", locations[n], price, t0 + n)
        ledger.mark_running(f"{name}-r{n:05d}", instance, t0 + 5)
    ledger.event(run.id, "duty", t0 + 30, ids[1])
    ledger.charge(run.id, t0 + 290)
    ledger.record_metrics(run.id, t0 + 290, [
        {"instance_id": ids[0], "state": "training", "epoch": 3, "samples": 900, "samples_per_second": 4.0,
         "loss": 2.0, "bytes_sent": 0, "bytes_received": 0},
        {"instance_id": ids[1], "state": "starting", "epoch": 0, "samples": 0, "samples_per_second": 0.0,
         "loss": None, "bytes_sent": 0, "bytes_received": 0}])
    if ended:
        for n in range(2):
            ledger.mark_ended(f"{name}-r{n:05d}", InstanceState.TERMINATED, t0 + 295, EndReason.TERMINATED_BY_REQUEST,
                              run.id)
        ledger.end_run(run.id, "duration reached", t0 + 295)
    ledger.close()


def test_a_driven_cluster_shows_burn_time_left_duty_roles_and_locations(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SPOTRAIN_HOME", str(home))
    cluster(home, "live", ended=False)
    with controller_lock("live"):  # this test process is the cluster's controller, as `launch` would be
        data = json.loads(run_cli("status", "live", "--json", home=home, check=True, timeout=120).stdout)
        text = run_cli("status", "live", home=home, check=True, timeout=120).stdout
    assert data["burn_usd_per_hour"] == pytest.approx(1.11)
    assert data["budget_runs_out_in_seconds"] == pytest.approx((1.0 - data["spent_usd"]) / 1.11 * 3600)
    assert 550 < data["remaining_seconds"] <= 600 and 295 < data["elapsed_seconds"] < 360
    assert data["duty"] == ["i-b"] and data["samples_per_second"] == 4.0  # only agents that train
    assert [(w["instance_id"], w["role"]) for w in data["workers"]] == [("i-a", "worker"), ("i-b", "backup")]
    assert "burn $1.110/h, the budget lasts" in text and "ends in " in text and "no controller" not in text
    assert "checkpoints written by i-b (local:zone-b)" in text and "newest checkpoint none yet" in text
    assert "local:zone-a: 1 training (1 worker)" in text and "local:zone-b: 1 starting (1 backup)" in text
    row = [line.split("│")[1:-1] for line in text.splitlines() if "i-b" in line and "│" in line]
    assert [cell.strip() for cell in row[0][:6]] == ["i-b", "local:zone-b", "starting", "backup", "0.0", "yes"]


def test_without_a_controller_nothing_counts_down_and_down_is_named(tmp_path):
    home = tmp_path / "home"
    cluster(home, "orphan", ended=False)  # its controller was kill -9'd: the ledger still says running
    data = json.loads(run_cli("status", "orphan", "--json", home=home, check=True, timeout=120).stdout)
    assert data["controller_pid"] is None and data["state"] == "running"
    assert data["remaining_seconds"] is None and data["budget_runs_out_in_seconds"] is None
    text = run_cli("status", "orphan", home=home, check=True, timeout=120).stdout
    assert "ends in" not in text and "the budget lasts" not in text
    assert "(running, no controller)" in text and "no controller drives this run" in text
    assert "`spotrain down orphan` stops them" in text and "`spotrain launch SPEC` resumes the run" in text


def test_a_lost_worker_makes_the_backup_a_worker(tmp_path):
    home = tmp_path / "home"
    cluster(home, "lossy", ended=False)
    ledger = Ledger.open_existing(home / "clusters" / "lossy" / "ledger.db")
    try:
        run = ledger.current_run()
        ledger.mark_ended("lossy-r00000", InstanceState.PREEMPTED, time.time(), EndReason.SPOT_PREEMPTION, run.id)
        assert [(w["instance_id"], w["role"]) for w in workers_of(ledger, run)] == [("i-b", "worker")]
        ledger.record_metrics(run.id, time.time(), [  # a draining worker is leaving; its replacement counts
            {"instance_id": "i-b", "state": "draining", "epoch": 0, "samples": 0, "samples_per_second": 0.0,
             "loss": None, "bytes_sent": 0, "bytes_received": 0}])
        assert [w["role"] for w in workers_of(ledger, run)] == ["leaving"]
    finally:
        ledger.close()


def test_a_stored_spec_this_version_cannot_read_leaves_the_roles_unknown():
    ledger = Ledger(":memory:")
    spec = ClusterSpec.model_validate({"name": "old", "budget": {"total_usd": 1.0}}).model_dump(mode="json")
    run = ledger.open_run(1.0, {**spec, "a_key_of_a_newer_version": 1}, time.time())
    ledger.record_request(run.id, "old-r00000", "local", "local:zone-a", 0.5, time.time())
    assert [(w["location"], w["role"]) for w in workers_of(ledger, run)] == [("local:zone-a", "-")]
    ledger.close()


@pytest.mark.parametrize("width", [80, 60])
def test_the_table_drops_columns_rather_than_cut_a_location_or_state_short(tmp_path, width):
    home = tmp_path / "home"
    long = ("gcp:europe-west4-a", "aws:ap-southeast-2c")
    cluster(home, "wide", ended=False, locations=long, ids=("i-0123456789abcdef0", "i-0fedcba9876543210"))
    ledger = Ledger.open_existing(home / "clusters" / "wide" / "ledger.db")
    run = ledger.current_run()
    workers = workers_of(ledger, run)
    ledger.close()
    data = {"cluster": "wide", "run": 1, "state": "running", "controller_pid": 4242, "elapsed_seconds": 300.0,
            "remaining_seconds": 600.0, "budget_usd": 1.0, "spent_usd": 0.1, "burn_usd_per_hour": 1.11,
            "egress_usd_per_hour": 0.0, "budget_runs_out_in_seconds": 2900.0, "checkpoint_path": None,
            "epoch": 3, "samples": 900, "samples_per_second": 4.0, "workers": workers,
            "duty": ["i-0fedcba9876543210"]}
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render(data))
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    assert "…" not in out.getvalue() and all(len(line) <= width for line in rows)
    for worker, location, state in zip(("i-0123456789abcdef0", "i-0fedcba9876543210"), long, ("training", "starting")):
        assert [line for line in rows if worker in line and location in line and f" {state} " in line], rows
    assert "loss" not in out.getvalue()  # the least important column went first


def test_an_ended_run_says_how_and_watch_stops(tmp_path):
    home = tmp_path / "home"
    cluster(home, "done", ended=True)
    for args in (("status", "done"), ("status", "done", "--watch")):
        result = run_cli(*args, home=home, check=True, timeout=120)
        assert result.stdout.strip().endswith("ended: duration reached; see `spotrain report done`")
        assert "instance" not in result.stdout  # no empty table
    result = run_cli("status", "--watch", "--json", home=home, timeout=120)
    assert result.returncode == 2 and result.stderr == "spotrain: error: --watch and --json: choose one\n"


def test_no_name_lists_the_clusters_even_when_there_is_one(tmp_path):
    home = tmp_path / "home"
    assert json.loads(run_cli("status", "--json", home=home, check=True, timeout=120).stdout) == []
    assert "no clusters yet" in run_cli("status", home=home, check=True, timeout=120).stdout
    cluster(home, "one", ended=True)
    rows = json.loads(run_cli("status", "--json", home=home, check=True, timeout=120).stdout)
    assert [(r["cluster"], r["state"]) for r in rows] == [("one", "ended")]
    assert "ended: duration reached" in run_cli("status", "--watch", home=home, check=True, timeout=120).stdout
    cluster(home, "two", ended=False)
    rows = json.loads(run_cli("status", "--json", home=home, check=True, timeout=120).stdout)
    assert [(r["cluster"], r["state"], r["end_reason"], r["workers"], r["training"]) for r in rows] == [
        ("one", "ended", "duration reached", 0, 0), ("two", "running", None, 2, 1)]
    text = run_cli("status", home=home, check=True, timeout=120).stdout
    assert "ended: duration reached" in text and "running, no controller" in text and "2 (1 training)" in text
    assert json.loads(run_cli("status", "two", "--json", home=home, check=True, timeout=120).stdout)["run"] == 1
