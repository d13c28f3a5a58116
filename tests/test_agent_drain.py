"""A drain whose window ends before the agent is done still ends every process the agent started.

The window can end on two paths of agents/daemon.py (`Agent._abandon`): with a step still in
flight (the role's work never returned), or while leaving the swarm (after the role's work, while
the role and hivemind shut down). A lone agent whose role tests/held_agent.py holds at one of those
points, past the window, takes each path on every run. A third, slow test has a real cause: agent
A trains beside a frozen peer, and which path A takes depends on where its averaging is when the
window ends (runs have seen both). On every path the agent's DHT process, the p2pd it started and
the optimizer's averagers must be gone when it has exited.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import admit, agent_config, processes_under, wait_for

from spotrain.access import ClusterAccess
from spotrain.providers.imds_server import MetadataServer, MetadataState
from spotrain.swarm_view import SwarmView

MARK = "SPOTRAIN_TEST_AGENT_DIR"  # inherited by everything an agent starts: finds them after it exits
AGENT = ["-m", "spotrain", "agent", "--user-data"]  # then the user-data file
HELD_AGENT = str(Path(__file__).parent / "held_agent.py")


def start_agent(tmp_path: Path, instance_id: str, peers: list[str], admission: dict, metadata_url: str | None = None,
                program: list[str] = AGENT) -> subprocess.Popen:
    work = tmp_path / instance_id
    work.mkdir()
    config = agent_config("drain-test", instance_id=instance_id, initial_peers=peers, admission=admission,
                          checkpoint={"store": str(tmp_path / "ckpt"), "every_epochs": 1000})
    (work / "user-data.json").write_text(config.to_json())
    env = dict(os.environ, **{MARK: str(work)})
    if metadata_url:
        env["SPOTRAIN_METADATA_URL"] = metadata_url
    return subprocess.Popen([sys.executable, *program, "user-data.json"], cwd=work, env=env,
                            stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def pids_under(path: Path) -> list[int]:
    return [int(line.split(":", 1)[0]) for line in processes_under(path)]


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError):
        return None


def assert_hivemind_running(agent: subprocess.Popen, work: Path) -> None:
    """The processes the drain must end are there, so the test can fail: the agent's DHT process
    (a child of the agent), the p2pd that DHT process started, and the averagers (more children)."""
    started = processes_under(work)
    shown = "\n".join(started)
    p2pd = [int(line.split(":", 1)[0]) for line in started if "p2pd" in line]
    assert p2pd, shown
    dht_process = parent_of(p2pd[0])
    assert dht_process is not None and parent_of(dht_process) == agent.pid, shown
    children = [pid for pid in pids_under(work) if parent_of(pid) == agent.pid]
    assert len([pid for pid in children if pid != dht_process]) >= 2, shown  # the optimizer's two averagers


@pytest.fixture
def agents(tmp_path):
    started: list[subprocess.Popen] = []
    yield started
    for agent in started:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(agent.pid, signum)
            except ProcessLookupError:
                pass
        agent.wait()
    for pid in pids_under(tmp_path):  # what a failing agent left behind
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def swarm(tmp_path):
    view = SwarmView("drain-test", ClusterAccess(tmp_path / "cluster", "drain-test"))
    yield view
    view.shutdown()


@pytest.fixture
def imds():
    server = MetadataServer(MetadataState("i-a", "zone-a"))
    server.start_background()
    yield server
    server.shutdown()


def drained(agent: subprocess.Popen, work: Path) -> tuple[str, list[str]]:
    """Once the agent exited (with 0: a drain), its log and what is left of its processes."""
    assert agent.wait(timeout=60) == 0
    return (work / "agent.log").read_text(), processes_under(work)


@pytest.mark.parametrize(("hold", "seconds_ahead", "path", "absent"), [
    # the step never returns: the shortest window (the notice's time less the daemon's 1.5 s margin,
    # at least 0.5 s) ends before the agent leaves
    ("step", 2.0, ["test role: step held", "drain window ending with a step still in flight: abandoning it"],
     ["leaving the swarm"]),
    # a window of seconds (less up to the watcher's 1 s poll): a lone agent's step, which waits on
    # no peer, ends well inside it, and the role's shutdown is held past it
    ("shutdown", 6.0, ["leaving the swarm", "test role: shutdown held",
                       "drain window ending while leaving the swarm: exiting now"], []),
], ids=["with-a-step-in-flight", "while-leaving-the-swarm"])
def test_a_drain_window_ending_before_the_agent_is_done_leaves_no_process_of_it(
        tmp_path, agents, swarm, imds, hold, seconds_ahead, path, absent):
    admitted = admit(swarm, ["i-a"])
    a = start_agent(tmp_path, "i-a", swarm.addresses(), admitted["i-a"], imds.url, program=[HELD_AGENT, hold])
    agents.append(a)
    wait_for(lambda: (s := swarm.statuses()) and "i-a" in s and s["i-a"].epoch >= 1, 240, "the agent training")
    assert_hivemind_running(a, tmp_path / "i-a")

    imds.state.post_notice(time.time() + seconds_ahead)
    log, left = drained(a, tmp_path / "i-a")
    lines = ["preemption notice", *path]
    assert all(line in log for line in lines), log[-3000:]
    assert sorted(lines, key=log.index) == lines, log[-3000:]  # the window ended at the held point
    assert not [line for line in [*absent, "drained"] if line in log], log[-3000:]
    assert left == [], "\n".join(left)


@pytest.mark.slow
def test_a_drain_window_ending_beside_a_frozen_peer_leaves_no_process_of_the_agent(tmp_path, agents, swarm, imds):
    """B frozen (SIGSTOP): A's averaging and every DHT call that reaches B wait on timeouts of
    seconds, and a notice 2 s ahead gives A 0.5 s. The window ends in A's step when it waits on B,
    else while A's optimizer shuts down (its averagers wait on B too)."""
    admitted = admit(swarm, ["i-a", "i-b"])
    a = start_agent(tmp_path, "i-a", swarm.addresses(), admitted["i-a"], imds.url)
    b = start_agent(tmp_path, "i-b", swarm.addresses(), admitted["i-b"])
    agents += [a, b]
    wait_for(lambda: (s := swarm.statuses()) and all(i in s and s[i].epoch >= 2 for i in ("i-a", "i-b")), 240,
             "both agents averaging (epoch 2)")
    assert_hivemind_running(a, tmp_path / "i-a")

    os.killpg(b.pid, signal.SIGSTOP)
    time.sleep(3.0)  # A reaches its next averaging round, with a peer that never answers
    imds.state.post_notice(time.time() + 2.0)
    log, left = drained(a, tmp_path / "i-a")
    assert "preemption notice" in log and "drain window ending" in log and "drained" not in log, log[-3000:]
    assert left == [], "\n".join(left)
