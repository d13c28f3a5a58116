"""Real agents (subprocesses) and a controller's DHT peer on 127.0.0.1: training, signed status,
checkpoint duty, draining on an IMDSv2 notice, resuming from the newest checkpoint."""

import os
import subprocess
import time

import pytest
from conftest import admit, start_agent, wait_for

from spotrain.access import ClusterAccess, checkpoint_trust
from spotrain.contracts.records import status_key
from spotrain.providers.imds_server import MetadataServer, MetadataState
from spotrain.stores import open_store
from spotrain.swarm_view import SwarmView


def user_data(cluster, instance_id, peers, store, admission: dict) -> dict:
    return {"admission": admission,
        "cluster": cluster, "instance_id": instance_id, "initial_peers": peers,
        "task": "spotrain.examples.tiny_gpt:task",
        "training": {"batch_size": 8, "target_batch_size": 64, "compression": {"gradients": "float16", "state": "none"},
                     "matchmaking_time": 2.0, "averaging_timeout": 15.0},
        "checkpoint": {"store": str(store), "every_epochs": 2}, "torch_threads": 1,
    }




def epochs(store) -> list[int]:
    """The epochs with a complete checkpoint in `store`, newest first."""
    opened = open_store(str(store))
    return sorted({m.epoch for m in opened.manifests() if opened.is_complete(m)}, reverse=True)


@pytest.fixture
def cleanup():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()


def test_agents_train_report_checkpoint_drain_and_resume(tmp_path, cleanup):
    cluster, store = "swarm-test", tmp_path / "ckpt"
    swarm = SwarmView(cluster, ClusterAccess(tmp_path / "cluster", cluster))
    admitted = admit(swarm, ["i-a", "i-b", "i-c"])
    imds = MetadataServer(MetadataState("i-b", "zone-b"))
    imds.start_background()
    try:
        peers = swarm.addresses()
        a = start_agent(tmp_path, user_data(cluster, "i-a", peers, store, admitted["i-a"]))
        b = start_agent(tmp_path, user_data(cluster, "i-b", peers, store, admitted["i-b"]), imds.url)
        cleanup += [a, b]
        swarm.assign_duty(["i-a"])

        # an epoch may pass without a group (matchmaking found none in time): wait for one that averaged
        statuses = wait_for(lambda: (s := swarm.statuses()) and all(
            i in s and s[i].epoch >= 3 for i in ("i-a", "i-b")) and s["i-a"].bytes_sent > 0
            and s["i-b"].bytes_received > 0 and s["i-a"].egress_bytes and s, 240,
            "both agents at epoch 3, having averaged together")
        assert statuses["i-a"].state == "training" and statuses["i-a"].samples > 0
        assert statuses["i-a"].bytes_sent > 0 and statuses["i-b"].bytes_received > 0
        # the bytes each sent are metered per destination: the other agent's peer id
        b_peer = {a.rsplit("/p2p/", 1)[-1] for a in statuses["i-b"].addresses}
        assert set(statuses["i-a"].egress_bytes) & b_peer and sum(statuses["i-a"].egress_bytes.values()) > 0
        assert statuses["i-a"].loss is not None
        swarm.assign_duty(["i-a"])
        wait_for(lambda: epochs(store), 120, "a checkpoint from the duty holder")
        assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporary files left

        # a record under i-a's signed subkey cannot be written by anyone else
        raw = swarm.dht.get(status_key(cluster), latest=True).value
        a_subkey = next(k for k, v in raw.items() if v.value["instance_id"] == "i-a")
        forged = dict(raw[a_subkey].value, state="draining")
        from hivemind.utils.timed_storage import get_dht_time
        assert not swarm.dht.store(status_key(cluster), forged, get_dht_time() + 30, subkey=a_subkey)

        # a preemption notice: b marks itself draining and exits 0 before the window ends
        epoch_at_notice = swarm.statuses()["i-a"].epoch
        imds.state.post_notice(time.time() + 20)
        wait_for(lambda: swarm.statuses()["i-b"].state == "draining", 10, "b draining")
        assert b.wait(timeout=20) == 0
        wait_for(lambda: swarm.statuses()["i-a"].epoch >= epoch_at_notice + 2, 120, "a training on alone")

        # a cluster started again resumes from the newest valid checkpoint
        swarm.assign_duty(["i-a"])
        newest = wait_for(lambda: (e := epochs(store)) and e[0] >= epoch_at_notice and e[0], 120,
                          "a newer checkpoint")
        os.killpg(a.pid, 9)
        a.wait()
        c = start_agent(tmp_path, user_data(cluster, "i-c", swarm.addresses(), store, admitted["i-c"]))
        cleanup.append(c)
        wait_for(lambda: (s := swarm.statuses().get("i-c")) and s.epoch >= newest, 120, "c resumed")
        assert "resumed from checkpoint epoch" in (tmp_path / "i-c" / "agent.log").read_text()
        # every manifest the duty holders wrote is sealed by an admitted peer (stores/seal.py)
        trust = checkpoint_trust(tmp_path / "cluster", cluster)
        assert all(trust.refusal(m) is None for m in open_store(str(store)).manifests())
    finally:
        imds.shutdown()
        swarm.shutdown()
