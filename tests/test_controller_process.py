"""The controller as a process: `down` signals only a controller it has verified, `launch --detach`
returns once its controller holds the cluster, signals to a foreground launch end the run as `down`
does, no call into the DHT blocks for ever, and a relaunch keeps the run's end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import ROOT, processes_under, run_cli, wait_for

from spotrain import swarm_view
from spotrain.cli import RUN_FAILED_EXIT
from spotrain.cluster_ops import run_end
from spotrain.controller_process import controller_lock, controller_pid, process_start_time
from spotrain.ledger import Ledger
from spotrain.orphans import children_of
from spotrain.swarm_view import SwarmUnavailable, SwarmView

# max_hourly_usd below every local price: a controller that holds the cluster, runs its DHT and
# ticks, but launches nothing, so these tests start no VM
IDLE = "name: idle\nbudget: {total_usd: 1.0, max_hourly_usd: 0.01}\nplacement: {workers: 1}\n"


def idle_spec(tmp_path: Path) -> Path:
    path = tmp_path / "idle.yaml"
    path.write_text(IDLE)
    return path


def hold_lock(home: Path, record: str, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holds the cluster's lock, its file saying `record`."""
    path = home / "clusters" / "idle" / "controller.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record)
    code = ("import fcntl, sys, time; h = open(sys.argv[1], 'r+'); fcntl.lockf(h, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.fixture
def bystander():
    """An unrelated process whose pid a forged lock file names."""
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def test_a_controller_records_its_pid_and_start_time_in_a_private_file(home):
    path = home / "clusters" / "idle" / "controller.lock"
    probe = ("import sys; from spotrain.controller_process import controller_pid; "
             "print(open(sys.argv[1]).read().strip(), controller_pid('idle'), sep=',')")
    with controller_lock("idle"):
        # read from another process: closing any descriptor of the file here would drop our POSIX lock
        seen = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        assert seen.stdout.strip() == f"{os.getpid()} {process_start_time(os.getpid())},{os.getpid()}"
        assert path.stat().st_mode & 0o777 == 0o600
    assert controller_pid("idle") is None


@pytest.mark.parametrize("record", ["", "-1", "garbage", "{pid}", "{pid} 1", "{pid} {start_plus_one}", "1 {start}"])
def test_a_lock_record_that_does_not_name_a_live_controller_is_not_believed(home, bystander, record):
    start = process_start_time(bystander.pid)
    holder = hold_lock(home, record.format(pid=bystander.pid, start=start, start_plus_one=start + 1))
    try:
        assert controller_pid("idle") is None
    finally:
        holder.kill()
        holder.wait()


def test_a_record_that_checks_out_is_believed(home, bystander):
    holder = hold_lock(home, f"{bystander.pid} {process_start_time(bystander.pid)}")
    try:
        assert controller_pid("idle") == bystander.pid
    finally:
        holder.kill()
        holder.wait()


def ended_run_ledger(home: Path) -> None:
    ledger = Ledger.create(home / "clusters" / "idle" / "ledger.db")
    run = ledger.open_run(1.0, {"name": "idle", "budget": {"total_usd": 1.0}}, now=time.time())
    ledger.end_run(run.id, "duration reached", now=time.time())
    ledger.close()


@pytest.mark.parametrize("holds_for", [3.0, 60.0])
def test_down_never_signals_the_process_a_forged_lock_names(tmp_path, bystander, holds_for):
    # the reproduction of the finding: a probe holds the lock while the file names an unrelated pid
    home = tmp_path / "home"
    ended_run_ledger(home)
    holder = hold_lock(home, f"{bystander.pid}\n", seconds=holds_for)
    try:
        result = run_cli("down", "idle", home=home, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopping the controller" not in result.stdout
    assert bystander.poll() is None  # alive: never signalled
    assert "every worker terminated" in result.stdout
    assert ("not a verified controller" in result.stdout) == (holds_for > 10)  # down waits 10 s for the lock


def test_launch_detach_returns_once_the_controller_holds_the_cluster_so_down_finds_it(tmp_path):
    home = tmp_path / "home"
    started = run_cli("launch", str(idle_spec(tmp_path)), "--detach", "--duration", "600", home=home, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    status = json.loads(run_cli("status", "idle", "--json", home=home, check=True).stdout)  # no waiting
    assert status["controller_pid"] and f"(pid {status['controller_pid']})" in started.stdout
    assert status["state"] == "running"
    stopped = run_cli("down", home=home, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopping the controller (pid {status['controller_pid']})" in stopped.stdout
    report = json.loads(run_cli("report", "--json", home=home, check=True).stdout)
    assert report["end_reason"] == "stopped by user"
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")


def test_launch_detach_of_a_controller_that_fails_prints_its_error(tmp_path):
    home = tmp_path / "home"
    ledger = home / "clusters" / "idle" / "ledger.db"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"not a database at all" * 100)
    result = run_cli("launch", str(idle_spec(tmp_path)), "--detach", home=home, timeout=180)
    assert result.returncode == 2
    assert result.stderr == (f"spotrain: error: {ledger}: not a spotrain ledger (no SQLite header); "
                             f"move it away to start afresh\n")
    assert "started in the background" not in result.stdout


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal's foreground job has it: a suite started in the background (`make test &`,
    a CI runner) passes SIGINT on ignored, and the controller rightly leaves an ignored signal alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def foreground_launch(tmp_path: Path, home: Path) -> tuple[subprocess.Popen, Path]:
    """A foreground `spotrain launch` in its own process group, once it ticks (its DHT runs)."""
    log = tmp_path / "launch.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "spotrain", "launch", str(idle_spec(tmp_path)),
                                    "--duration", "600", "--tick", "1", "--no-report"],
                                   env=dict(os.environ, SPOTRAIN_HOME=str(home)), cwd=ROOT, start_new_session=True,
                                   stdout=output, stderr=subprocess.STDOUT, preexec_fn=_as_from_a_terminal)
    wait_for(lambda: "workers 0/1" in log.read_text() or process.poll() is not None, 120, "the first tick")
    assert process.poll() is None, log.read_text()
    assert children_of(process.pid), "the controller's DHT process"
    return process, log


def ledger_end_reason(home: Path) -> str | None:
    ledger = Ledger(home / "clusters" / "idle" / "ledger.db")
    try:
        run = ledger.current_run()
        return run.end_reason if run else None
    finally:
        ledger.close()


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_foreground_launchs_process_group_ends_the_run_as_down_does(tmp_path, number):
    home = tmp_path / "home"
    process, log = foreground_launch(tmp_path, home)
    os.killpg(process.pid, number)  # as `timeout`, a service manager or Ctrl-C does: the DHT process too
    try:
        assert process.wait(timeout=90) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "run ended: stopped by user" in log.read_text()
    assert ledger_end_reason(home) == "stopped by user"
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")


def test_a_controller_whose_dht_process_dies_says_so_and_ends_the_run(tmp_path):
    home = tmp_path / "home"
    process, log = foreground_launch(tmp_path, home)
    for child in children_of(process.pid):
        os.kill(child, signal.SIGTERM)  # the DHT process (it takes its p2pd along)
    try:
        assert process.wait(timeout=90) == RUN_FAILED_EXIT, log.read_text()  # not the end it was launched for
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "the controller's DHT process died: ending the run" in log.read_text()
    assert ledger_end_reason(home) == "the controller's DHT process died"
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")


def test_a_relaunch_keeps_the_runs_end(tmp_path):
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(1.0, {}, now=1000.0)
    assert run_end(ledger, run, 240.0) == 1240.0
    relaunched = ledger.open_run(1.0, {}, now=1100.0)  # the same run, 100 s later
    assert relaunched.id == run.id
    assert run_end(ledger, relaunched, 240.0) == 1240.0  # not 1340
    assert run_end(ledger, relaunched, None) == 1240.0
    ledger.close()


class SilentDHT:
    """A DHT process that lives but never answers (its p2pd died under it)."""

    exitcode: int | None = None

    def is_alive(self) -> bool:
        return True

    def get(self, *args, return_future: bool = False, **kwargs) -> Future:
        assert return_future
        return Future()

    store = run_coroutine = get


class DeadDHT(SilentDHT):
    exitcode = -9

    def is_alive(self) -> bool:
        return False


def view_of(dht) -> SwarmView:
    import tempfile

    from spotrain.access import ClusterAccess

    view = SwarmView.__new__(SwarmView)  # without starting a real DHT
    view.cluster, view.dht, view.client_mode = "idle", dht, False
    view.access = ClusterAccess(Path(tempfile.mkdtemp()) / "idle", "idle")
    return view


@pytest.mark.parametrize("call", ["statuses", "addresses", "assign_duty"])
def test_every_dht_call_of_the_controller_ends_in_time(monkeypatch, call):
    monkeypatch.setattr(swarm_view, "DHT_CALL_TIMEOUT_SECONDS", 0.2)
    args = (["i-1"],) if call == "assign_duty" else ()
    with pytest.raises(SwarmUnavailable, match="has exited"):
        getattr(view_of(DeadDHT()), call)(*args)
    began = time.monotonic()
    with pytest.raises(SwarmUnavailable, match="answered nothing within"):
        getattr(view_of(SilentDHT()), call)(*args)
    assert time.monotonic() - began < 5
