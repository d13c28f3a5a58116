"""spotrain's codecs between real hivemind peers on 127.0.0.1, each peer its own process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from averaging_peer import peer_tensors
from conftest import admit, start_agent, wait_for

from spotrain.access import ClusterAccess
from spotrain.agents.codec_check import EXIT_CODEC_MISMATCH
from spotrain.kernels.table import nominal_ratio
from spotrain.swarm_view import SwarmView

HERE = Path(__file__).resolve().parent


# Once flaky (1 run in 3 on a loaded machine, an average far from the true mean): a peer's step
# ends as soon as it has its own results, before the averages it owes the other peer are encoded
# and sent, and a peer that left then cut that reply (hivemind keeps the cut part un-averaged);
# bytes read then missed the reply. averaging_peer.py waits for the other peer's result before
# either. With a 1 s delay on one peer's replies, leaving early fails every run and the wait
# passes. The 2% bound is 8-bit error twice over: the measured errors are 0.004-0.011 (two
# partitions are possible, by peer id order), the per-block RMS error of blockwise8 being
# absmax / (127 sqrt 12), about 0.007 sigma for a Gaussian block of 1024.
def test_two_peers_average_with_blockwise8_close_to_the_true_mean(tmp_path):
    peers = []
    for i in range(2):
        with open(tmp_path / f"peer{i}.log", "w") as log:
            peers.append(subprocess.Popen([sys.executable, str(HERE / "averaging_peer.py"), str(i), str(tmp_path),
                                           "blockwise8"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        # both at once: a peer that fails ends the wait, and both logs say why
        deadline = time.monotonic() + 300  # past averaging_peer.GIVE_UP_SECONDS and its wait for the other
        while time.monotonic() < deadline and not (all(peer.poll() is not None for peer in peers)
                                                   or any(peer.poll() not in (None, 0) for peer in peers)):
            time.sleep(0.2)
        assert [peer.poll() for peer in peers] == [0, 0], "\n".join(
            f"peer{i}.log:\n" + (tmp_path / f"peer{i}.log").read_text()[-3000:] for i in range(2))
    finally:
        for peer in peers:  # its group too: a peer that failed may have left its p2pd behind
            try:
                os.killpg(peer.pid, 9)
            except ProcessLookupError:
                pass
            peer.wait()
    truth = [(a + b) / 2 for a, b in zip(peer_tensors(0), peer_tensors(1))]
    # each peer sends the half the other averages and the reply for the half it averages itself
    fp32_bytes_each_peer_sends = sum(t.numel() for t in truth) * 4
    for index in range(2):
        traffic = json.loads((tmp_path / f"traffic{index}.json").read_text())
        assert traffic["group_size"] == 2
        result = torch.load(tmp_path / f"result{index}.pt")
        for got, want, mine in zip(result, truth, peer_tensors(index)):
            assert (got - want).norm() / want.norm() < 0.02  # 8 bits each way
            assert (mine - want).norm() / want.norm() > 0.3  # so it did average
        # and both went over the wire in 8 bits
        ratio = fp32_bytes_each_peer_sends / traffic["sent"]
        assert 0.9 * nominal_ratio("blockwise8") < ratio < 1.1 * nominal_ratio("blockwise8")


def agent_config(cluster, instance_id, peers, store, gradients, state, admission: dict) -> dict:
    return {"admission": admission,
        "cluster": cluster, "instance_id": instance_id, "initial_peers": peers,
        "task": "spotrain.examples.tiny_gpt:task",
        "training": {"batch_size": 8, "target_batch_size": 64, "compression": {"gradients": gradients, "state": state},
                     "matchmaking_time": 2.0, "averaging_timeout": 15.0, "delayed_updates": True},
        "checkpoint": {"store": str(store), "every_epochs": 100}, "torch_threads": 1,
    }






def test_agents_train_with_blockwise_codecs_and_a_different_codec_table_fails_loudly(tmp_path, agents):
    from spotrain.kernels import codec_table_fingerprint

    cluster, store = "codec-test", tmp_path / "ckpt"
    swarm = SwarmView(cluster, ClusterAccess(tmp_path / "cluster", cluster))
    admitted = admit(swarm, ["i-a", "i-b", "i-c"])
    try:
        peers = swarm.addresses()
        agents.append(start_agent(tmp_path, agent_config(cluster, "i-a", peers, store, "blockwise4", "blockwise8",
                                                          admitted["i-a"])))
        agents.append(start_agent(tmp_path, agent_config(cluster, "i-c", peers, store, "blockwise4", "blockwise8",
                                                          admitted["i-c"])))
        statuses = wait_for(lambda: (s := swarm.statuses()) and all(
            i in s and s[i].epoch >= 3 and s[i].bytes_sent > 0 and s[i].bytes_received > 0 for i in ("i-a", "i-c"))
            and s, 240, "both agents at epoch 3, having averaged")
        table = codec_table_fingerprint("blockwise4", "blockwise8")
        assert statuses["i-a"].codec_table == table == statuses["i-c"].codec_table
        assert "CodecMismatchError" not in (tmp_path / "i-a" / "agent.log").read_text()

        # same spotrain, another choice of codecs: it must refuse at join, not decode garbage
        b = start_agent(tmp_path, agent_config(cluster, "i-b", swarm.addresses(), store, "blockwise8", "blockwise8",
                                               admitted["i-b"]))
        agents.append(b)
        assert b.wait(timeout=120) == EXIT_CODEC_MISMATCH
        log = (tmp_path / "i-b" / "agent.log").read_text()
        assert "refusing to train: codec table mismatch" in log and table in log
        assert "i-b" not in swarm.statuses() or swarm.statuses()["i-b"].state == "starting"
        epoch = swarm.statuses()["i-a"].epoch
        wait_for(lambda: swarm.statuses()["i-a"].epoch > epoch, 120, "a and c training on")
        assert agents[0].poll() is None and agents[1].poll() is None
    finally:
        swarm.shutdown()


def test_nan_gradients_skip_the_step_and_never_reach_the_peers(tmp_path, agents):
    """nan_task makes every third backward pass NaN (with a finite loss) on one agent."""
    cluster, store = "nan-test", tmp_path / "ckpt"
    swarm = SwarmView(cluster, ClusterAccess(tmp_path / "cluster", cluster))
    admitted = admit(swarm, ["i-sick", "i-well"])
    try:
        peers = swarm.addresses()
        sick = agent_config(cluster, "i-sick", peers, store, "blockwise8", "blockwise8", admitted["i-sick"])
        sick["task"] = "nan_task:task"
        agents.append(start_agent(tmp_path, sick))
        agents.append(start_agent(tmp_path, agent_config(cluster, "i-well", peers, store, "blockwise8", "blockwise8",
                                                          admitted["i-well"])))
        statuses = wait_for(lambda: (s := swarm.statuses()) and all(
            i in s and s[i].epoch >= 4 and s[i].bytes_received > 0 for i in ("i-sick", "i-well")) and s, 240,
            "both agents at epoch 4, having averaged")
        assert all(status.loss is not None and status.loss < 10 for status in statuses.values())
        assert agents[0].poll() is None and agents[1].poll() is None  # no crash
        assert "non-finite gradients: step skipped" in (tmp_path / "i-sick" / "agent.log").read_text()
        # a NaN averaged into i-well's parameters would make its own losses non-finite
        assert "non-finite" not in (tmp_path / "i-well" / "agent.log").read_text()
    finally:
        swarm.shutdown()
