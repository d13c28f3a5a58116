import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotrain.contracts.states import AgentState, EndReason, InstanceState, LaunchReason
from spotrain.errors import LedgerTooNew
from spotrain.ledger import Ledger, _run
from spotrain.ledger_schema import SCHEMA_VERSION
from spotrain.report import build_report

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.create(tmp_path / "c" / "ledger.db")
    yield ledger
    ledger.close()


def test_wal_mode(ledger):
    assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_charges_price_times_seconds_and_stops_at_end(ledger):
    run = ledger.open_run(10.0, {"name": "c"}, now=1000.0)
    ledger.record_request(run.id, "c-r00000", "local", "local:zone-a", 3.6, now=1000.0)
    ledger.mark_running("c-r00000", "i-1", launched_at=1000.0)
    assert ledger.charge(run.id, now=1010.0) == pytest.approx(0.01)  # 10 s at $3.6/h
    assert ledger.charge(run.id, now=1010.0) == 0.0  # nothing twice
    ledger.mark_ended("c-r00000", InstanceState.PREEMPTED, ended_at=1015.0, reason=EndReason.SPOT_PREEMPTION,
                      run_id=run.id)
    assert ledger.charge(run.id, now=2000.0) == pytest.approx(0.005)  # only up to the end
    assert ledger.spent(run.id) == pytest.approx(0.015)
    assert ledger.spend_by_location(run.id) == [
        {"location": "local:zone-a", "usd": pytest.approx(0.015), "seconds": pytest.approx(15.0)}]
    assert [e["kind"] for e in ledger.events(run.id)] == ["run-started", "launch", "preempted"]


def test_a_run_continues_until_it_ends(ledger):
    first = ledger.open_run(5.0, {}, now=1.0)
    assert ledger.open_run(6.0, {}, now=2.0).id == first.id  # a restarted controller continues it
    ledger.end_run(first.id, "down", now=3.0)
    assert ledger.open_run(5.0, {}, now=4.0).id == first.id + 1


def test_mark_ended_is_idempotent(ledger):
    run = ledger.open_run(5.0, {}, now=1.0)
    ledger.record_request(run.id, "r", "local", "l", 1.0, now=1.0)
    ledger.mark_running("r", "i", 1.0)
    ledger.mark_ended("r", InstanceState.PREEMPTED, 2.0, EndReason.SPOT_PREEMPTION, run.id)
    ledger.mark_ended("r", InstanceState.TERMINATED, 3.0, EndReason.TERMINATED_BY_REQUEST, run.id)
    (row,) = ledger.instances()
    assert (row.state, row.ended_at) == ("preempted", 2.0)


def test_states_and_reasons_read_back_as_enums(ledger):
    run = ledger.open_run(5.0, {}, now=1.0)
    ledger.record_request(run.id, "r", "aws", "aws:us-east-1a", 1.0, now=1.0, reason=LaunchReason.MIGRATION)
    ledger.mark_ended("r", InstanceState.FAILED, 2.0, EndReason.LAUNCH_FAILED, run.id, "CapacityError: full")
    (row,) = ledger.instances(states=(InstanceState.FAILED,))
    assert row.state is InstanceState.FAILED and row.reason is LaunchReason.MIGRATION
    assert row.end_reason is EndReason.LAUNCH_FAILED and row.end_detail == "CapacityError: full"
    assert ledger.events(run.id, kinds=("failed",))[0]["detail"] == "launch failed: CapacityError: full"


def open_v0_fixture(tmp_path: Path) -> Ledger:
    """The ledger spotrain 629fdf5 wrote (schema version 1, user_version 0), opened with today's code."""
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.executescript((FIXTURES / "ledger-v0.sql").read_text())
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    return Ledger.open_existing(path)


# the v0 fixture's end reasons, as 629fdf5 wrote them, and what they read as now
LEGACY_END_REASONS = {
    "c-r00000": ("spot preemption", EndReason.SPOT_PREEMPTION, ""),
    "c-r00001": ("spot preemption without notice", EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE, ""),
    "c-r00002": ("terminated by request", EndReason.TERMINATED_BY_REQUEST, ""),
    "c-r00003": ("CapacityError: no spot capacity in aws:us-east-1a", EndReason.LAUNCH_FAILED,
                 "CapacityError: no spot capacity in aws:us-east-1a"),
    "c-r00004": ("no offer in aws:us-east-1b", EndReason.NO_OFFER, "aws:us-east-1b"),
    "c-r00005": ("never launched", EndReason.NEVER_LAUNCHED, ""),
    "c-r00006": ("vanished from provider", EndReason.VANISHED, ""),
    "c-r00007": ("agent failed (exit 3)", EndReason.AGENT_FAILED, "exit 3"),
    "c-r00008": ("vm lost", EndReason.VM_LOST, ""),
    "c-r00009": ("spot interruption", EndReason.SPOT_PREEMPTION, ""),
    "c-r00010": ("Client.UserInitiatedShutdown", EndReason.TERMINATED_BY_REQUEST, ""),
    "c-r00011": ("terminated", EndReason.ENDED_BY_PROVIDER, "terminated"),
}


def test_a_ledger_of_the_unversioned_schema_opens_with_typed_states_and_reasons(tmp_path):
    ledger = open_v0_fixture(tmp_path)
    try:
        assert ledger._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = {row.request_id: row for row in ledger.instances()}
        written = {e["request_id"]: e["detail"] for e in ledger.events(1, kinds=("preempted", "terminated", "failed"))}
        for request_id, (text, reason, detail) in LEGACY_END_REASONS.items():
            assert written[request_id] == text  # the events keep the words 629fdf5 wrote
            assert (rows[request_id].end_reason, rows[request_id].end_detail) == (reason, detail)
            assert type(rows[request_id].end_reason) is EndReason
        assert all(type(row.state) is InstanceState and type(row.reason) is LaunchReason for row in rows.values())
        assert {r.request_id for r in ledger.instances(states=(InstanceState.RUNNING,))} == {"c-r00012"}
        assert {r.request_id for r in ledger.instances(states=(InstanceState.REQUESTED,))} == {"c-r00013"}
        assert rows["c-r00011"].reason is LaunchReason.ADOPTED
        assert [m["state"] for m in ledger.metrics(1)][:3] == [AgentState.STARTING, AgentState.TRAINING,
                                                               AgentState.DRAINING]
    finally:
        ledger.close()


def test_reports_of_an_unversioned_ledger_are_unchanged(tmp_path):
    ledger = open_v0_fixture(tmp_path)
    try:
        runs = [_run(row) for row in ledger._db.execute("SELECT * FROM runs ORDER BY id")]
        reports = [build_report(ledger, run, "c") for run in runs]
        expected = json.loads((FIXTURES / "ledger-v0-report.json").read_text())
        # the report may gain keys (the --json contract is extended, never changed); the old ones hold
        assert [{key: report[key] for key in old} for report, old in zip(json.loads(json.dumps(reports)), expected)] \
            == expected
        assert reports[0]["preemptions"] == 3 and reports[0]["preemptions_without_notice"] == 1
        assert [report["planned"] for report in reports] == [None] * len(reports)  # launched before plans were kept
    finally:
        ledger.close()


def test_a_ledger_of_schema_version_3_opens_with_its_rows_and_reports(tmp_path):
    """A ledger as 20fa7aa wrote it: whatever migration comes next is run on this schema."""
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.executescript((FIXTURES / "ledger-v3.sql").read_text())
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()
    ledger = Ledger.open_existing(path)
    try:
        assert ledger._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = {row.request_id: row for row in ledger.instances()}
        assert {k: (r.state, r.end_reason, r.reason) for k, r in rows.items()} == {
            "c-r00000": (InstanceState.TERMINATED, EndReason.TERMINATED_BY_REQUEST, LaunchReason.INITIAL),
            "c-r00001": (InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE, LaunchReason.INITIAL),
            "c-r00002": (InstanceState.FAILED, EndReason.LAUNCH_FAILED, LaunchReason.REPLACEMENT)}
        assert rows["c-r00002"].end_detail == "CapacityError: zone-b full"
        assert ledger.spent(1) == pytest.approx(0.10072222222222223)  # 590 s at $0.30/h, 388 s at $0.20/h, $0.03 egress
        assert ledger.egress_spent(1) == pytest.approx(0.03)  # 3 GB across zones at $0.01/GB
        assert [m["state"] for m in ledger.metrics(1)] == [AgentState.TRAINING, AgentState.TRAINING]
        report = build_report(ledger, ledger.run(1), "c")
        assert (report["preemptions"], report["preemptions_without_notice"]) == (1, 1)
    finally:
        ledger.close()


def test_migrating_twice_changes_nothing(tmp_path):
    open_v0_fixture(tmp_path).close()
    ledger = Ledger.open_existing(tmp_path / "ledger.db")
    try:
        rows = {row.request_id: row for row in ledger.instances()}
        assert rows["c-r00007"].end_detail == "exit 3"
    finally:
        ledger.close()


def test_a_ledger_of_a_newer_spotrain_is_refused_with_one_line(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger.create(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerTooNew) as refused:
        Ledger.open_existing(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "upgrade spotrain" in message


WRITER = """
import sys, time
from pathlib import Path
from spotrain.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]))
run = ledger.open_run(1.0, {}, now=0.0)
i = 0
while True:
    ledger.event(run.id, "tick", float(i), detail=str(i))
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_run_loses_nothing_committed(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger.create(path).close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.time() + 60
    while acknowledged < 200 and time.time() < deadline:
        acknowledged = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'tick'").fetchone()[0]
    assert stored >= acknowledged + 1  # every write it reported as done is there


def test_an_instance_never_ends_before_what_was_charged(tmp_path):
    """A VM lost without notice may report an end (its boot) before the ticks that charged it."""
    from spotrain.contracts.states import EndReason, InstanceState
    from spotrain.ledger import Ledger

    ledger = Ledger(str(tmp_path / "l.db"))
    run = ledger.open_run(10.0, {"name": "c"}, 0.0)
    ledger.record_request(run.id, "r-1", "local", "local:zone-a", 3.6, 0.0)
    ledger.mark_running("r-1", "i-1", 0.0)
    ledger.charge(run.id, 100.0)
    ledger.mark_ended("r-1", InstanceState.TERMINATED, 5.0, EndReason.VM_LOST, run.id)
    row = ledger.instances()[0]
    assert row.ended_at == 100.0 and row.charged_until == 100.0
    assert ledger.spent(run.id) == pytest.approx(3.6 * 100 / 3600)
    ledger.close()
