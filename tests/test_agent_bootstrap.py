"""Real agents whose launch-time peers are all gone: the first starts the swarm alone, keeps its peer
id across a restart, and the next one joins through the live peers its metadata service lists."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import admissions, admit, agent_config, wait_for

from spotrain.access import ClusterAccess
from spotrain.contracts.live_peers import PEERS_TAG
from spotrain.providers.imds_server import MetadataServer, MetadataState
from spotrain.swarm_view import SwarmView

GONE = "/ip4/127.0.0.1/tcp/9/p2p/QmTr1gcgqcGU8U2wjzR1KHF9JoZZHe6oEB9nGAtxSWgbu9"  # a controller that died


def start(work: Path, instance_id: str, metadata_url: str, admission: dict) -> subprocess.Popen:
    work.mkdir(exist_ok=True)
    store = {"store": str(work.parent / "ckpt"), "every_epochs": 50}
    config = agent_config("boot", instance_id=instance_id, initial_peers=[GONE], host="0.0.0.0",
                          announce_host="127.0.0.1", checkpoint=store, admission=admission)
    (work / "user-data.json").write_text(config.to_json())
    env = dict(os.environ, SPOTRAIN_METADATA_URL=metadata_url)
    with open(work / "agent.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "spotrain", "agent", "--user-data", "user-data.json"],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def addresses(work: Path) -> list[str]:
    path = work / "swarm-addresses.json"
    return json.loads(path.read_text()) if path.exists() else []


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 9)
    process.wait()


def test_alone_then_same_identity_after_a_restart_then_joined_through_live_peers(tmp_path):
    servers, processes, swarm = [], [], None
    access = ClusterAccess(tmp_path / "cluster", "boot")
    admitted = admissions(access, ["i-a", "i-b"])[2]  # as the controller does before it launches them
    try:
        def vm(name: str) -> tuple[Path, str]:
            peers = tmp_path / f"{name}-peers"
            server = MetadataServer(MetadataState(name, "zone-a", live_files={f"tags/instance/{PEERS_TAG}": peers}))
            server.start_background()
            servers.append(server)
            return peers, server.url

        a_peers, a_url = vm("i-a")
        a_peers.write_text("")  # the controller lists nobody: an empty cluster
        a_work = tmp_path / "i-a"
        processes.append(start(a_work, "i-a", a_url, admitted["i-a"]))
        first = wait_for(lambda: addresses(a_work), 120, "a in the swarm")
        assert first[0].startswith("/ip4/127.0.0.1/tcp/")  # announced, although it listens on 0.0.0.0
        log = (a_work / "agent.log").read_text()
        assert "starting the swarm alone" in log
        assert stat.S_IMODE((a_work / "swarm-identity.key").stat().st_mode) & 0o077 == 0  # the key is a secret

        stop(processes.pop())
        (a_work / "swarm-addresses.json").unlink()
        processes.append(start(a_work, "i-a", a_url, admitted["i-a"]))
        assert wait_for(lambda: addresses(a_work), 120, "a back") == first  # same peer id, same port

        # as a controller: admission first (its gate calls only admitted peers: built with `first` as its
        # initial peers before any record, its bootstrap ping to A was refused and it never found A),
        # then the live agents pinged into its routing table
        swarm = SwarmView("boot", access)
        admit(swarm, ["i-a", "i-b"])  # the same identities, a fresh record
        assert swarm.join(first) == 1
        b_peers, b_url = vm("i-b")
        b_peers.write_text(" ".join(first))  # what a controller publishes: the live agents
        b_work = tmp_path / "i-b"
        processes.append(start(b_work, "i-b", b_url, admitted["i-b"]))
        statuses = wait_for(lambda: (s := swarm.statuses()).keys() >= {"i-a", "i-b"} and s, 180, "a and b report")
        assert statuses["i-b"].addresses == tuple(addresses(b_work))
        log = (b_work / "agent.log").read_text()
        assert "bootstrapping from 1 live peer(s)" in log and "starting the swarm alone" not in log
        assert "failed to connect to bootstrap peers" not in log  # the live peer was tried with the dead one
    finally:
        for process in processes:
            stop(process)
        if swarm is not None:
            swarm.shutdown()
        for server in servers:
            server.shutdown()
