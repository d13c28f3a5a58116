"""A drain whose window ends mid-shutdown still ends every process the agent started.

Agent A trains beside agent B; B is frozen (SIGSTOP), so A's averaging and every DHT call that
reaches B wait on timeouts. A notice 2 s ahead then gives A 0.5 s to drain: the window ends while
A is blocked, and A exits through its "drain window ending" path. Its DHT process, the p2pd it
started and the optimizer's averagers must be gone when it has exited.
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


def start_agent(tmp_path: Path, instance_id: str, peers: list[str], admission: dict, metadata_url: str | None = None):
    work = tmp_path / instance_id
    work.mkdir()
    config = agent_config("drain-test", instance_id=instance_id, initial_peers=peers, admission=admission,
                          checkpoint={"store": str(tmp_path / "ckpt"), "every_epochs": 1000})
    (work / "user-data.json").write_text(config.to_json())
    env = dict(os.environ, **{MARK: str(work)})
    if metadata_url:
        env["SPOTRAIN_METADATA_URL"] = metadata_url
    return subprocess.Popen([sys.executable, "-m", "spotrain", "agent", "--user-data", "user-data.json"], cwd=work,
                            env=env, stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def pids_under(path: Path) -> list[int]:
    return [int(line.split(":", 1)[0]) for line in processes_under(path)]


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


def test_a_drain_window_ending_mid_shutdown_leaves_no_process_of_the_agent(tmp_path, agents):
    swarm = SwarmView("drain-test", ClusterAccess(tmp_path / "cluster", "drain-test"))
    admitted = admit(swarm, ["i-a", "i-b"])
    imds = MetadataServer(MetadataState("i-a", "zone-a"))
    imds.start_background()
    try:
        a = start_agent(tmp_path, "i-a", swarm.addresses(), admitted["i-a"], imds.url)
        b = start_agent(tmp_path, "i-b", swarm.addresses(), admitted["i-b"])
        agents += [a, b]
        wait_for(lambda: (s := swarm.statuses()) and all(i in s and s[i].epoch >= 2 for i in ("i-a", "i-b")), 240,
                 "both agents averaging (epoch 2)")
        started_by_a = processes_under(tmp_path / "i-a")
        assert any("p2pd" in line for line in started_by_a), started_by_a
        assert len(started_by_a) >= 4, started_by_a  # the agent, its DHT process, p2pd, the averagers

        os.killpg(b.pid, signal.SIGSTOP)
        time.sleep(3.0)  # A reaches its next averaging round, with a peer that never answers
        imds.state.post_notice(time.time() + 2.0)
        assert a.wait(timeout=60) == 0
        left = processes_under(tmp_path / "i-a")
        log = (tmp_path / "i-a" / "agent.log").read_text()
        assert "preemption notice" in log and "drain window ending" in log, log[-3000:]
        assert left == [], "\n".join(left)
    finally:
        imds.shutdown()
        swarm.shutdown()
