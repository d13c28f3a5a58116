import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from spotrain.ledger import Ledger


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
    ledger.mark_ended("c-r00000", "preempted", ended_at=1015.0, reason="spot preemption", run_id=run.id)
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
    ledger.mark_ended("r", "preempted", 2.0, "x", run.id)
    ledger.mark_ended("r", "terminated", 3.0, "y", run.id)
    (row,) = ledger.instances()
    assert (row.state, row.ended_at) == ("preempted", 2.0)


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
