"""A stage move in a real swarm: five stage peers of a 2-stage pipeline and a trainer, all real
agents on 127.0.0.1. A peer of the least-loaded stage moves to the most-loaded one, having
downloaded that stage from its peers first, and the pipeline keeps training.

The pure parts are tested without a network: the move decision in test_pipeline_balance.py, the
download in test_stage_averaging.py. This is the whole path, so it waits for events (records,
log lines), never for a time."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import admit, start_agent, wait_for

from spotrain.access import ClusterAccess
from spotrain.contracts.stage_records import StageRecord, found_stage_records, latest_records, stages_key
from spotrain.contracts.states import AgentState
from spotrain.swarm_view import SwarmView

CLUSTER = "move-test"
TASK = "spotrain.examples.tiny_gpt_pipeline:task_2stage"
STAGE_PEERS = [f"peer{index}" for index in range(5)]
MOVING = re.compile(r"moving from stage (\d) to (\d): predicted pipeline ([\d.]+) -> ([\d.]+) samples/s")


def user_data(swarm: SwarmView, name: str, role: str, admission: dict, store: Path) -> dict:
    return {"cluster": CLUSTER, "instance_id": name, "initial_peers": swarm.addresses(), "admission": admission,
            "task": TASK, "torch_threads": 1, "sigterm_grace_seconds": 20.0,
            "training": {"batch_size": 4, "target_batch_size": 64, "matchmaking_time": 2.0, "averaging_timeout": 10.0,
                         "compression": {"gradients": "none", "state": "float16", "activations": "blockwise8"}},
            "mode": "swarm",
            "pipeline": {"role": role, "stages": 2, "max_in_flight": 4, "rebalance_seconds": 6.0},
            "checkpoint": {"store": str(store), "every_epochs": 1000}}


def serving(swarm: SwarmView) -> dict[str, StageRecord]:
    """The serving peers' fresh records (a killed peer's stops being refreshed), by instance."""
    found = swarm.dht.get(stages_key(CLUSTER), latest=True)
    records = latest_records(found_stage_records(found), time.time(), ttl=10.0)
    return {r.instance_id: r for r in records if r.state == AgentState.TRAINING}


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / name / "agent.log").read_text(errors="replace")


def movers(tmp_path: Path, names: list[str]) -> dict[str, re.Match[str]]:
    return {name: found for name in names if (found := MOVING.search(log_of(tmp_path, name)))}


def served_by(swarm: SwarmView, name: str) -> int:
    """Microbatch calls `name` answered, over every stage it served, by its newest status."""
    status = swarm.statuses().get(name)
    return status.served if status is not None else 0


def trainer_samples(swarm: SwarmView) -> int:
    status = swarm.statuses().get("trainer")
    return status.samples if status is not None else 0


@pytest.mark.slow  # six agents start torch and hivemind on two shared cores: minutes
def test_a_peer_moves_to_the_most_loaded_stage_after_downloading_it_and_training_goes_on(tmp_path, agents):
    swarm = SwarmView(CLUSTER, ClusterAccess(tmp_path / "cluster", CLUSTER))
    admitted = admit(swarm, [*STAGE_PEERS, "trainer"])
    store = tmp_path / "store"
    try:
        for name in STAGE_PEERS:
            agents.append(start_agent(tmp_path, user_data(swarm, name, "stage", admitted[name], store)))
        wait_for(lambda: len(serving(swarm)) == 5, 400, "five stage peers serving")
        agents.append(start_agent(tmp_path, user_data(swarm, "trainer", "trainer", admitted["trainer"], store)))
        wait_for(lambda: trainer_samples(swarm) > 0 and all(r.samples_per_second > 0 for r in serving(swarm).values())
                 and len(serving(swarm)) == 5, 300, "the trainer training through every measured stage peer")

        killed = None
        if not movers(tmp_path, STAGE_PEERS):
            # 3/2 with stages of about equal cost: no move gains. Without notice, one peer of the
            # two-peer stage goes: 3/1, and a peer of the three may move (its stage keeps two).
            by_stage: dict[int, list[str]] = {}
            for instance, record in sorted(serving(swarm).items()):
                by_stage.setdefault(record.stage, []).append(instance)
            smaller = min(by_stage.values(), key=len)
            if len(smaller) == 2 and max(len(peers) for peers in by_stage.values()) == 3:
                killed = smaller[0]
                process = agents[STAGE_PEERS.index(killed)]
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        survivors = [name for name in STAGE_PEERS if name != killed]
        mover, found = next(iter(wait_for(lambda: movers(tmp_path, survivors), 300, "a stage move").items()))
        source, target, before, after = int(found[1]), int(found[2]), float(found[3]), float(found[4])
        assert source != target and after > before

        # the mover downloaded the target stage from a live peer before serving it
        log = wait_for(lambda: (text := log_of(tmp_path, mover)) and f"now serving stage {target}" in text and text,
                       120, "the mover serving its new stage")
        moving_at = log.index(found[0])
        downloaded_at = log.index(f"stage {target}: parameters downloaded from a live peer", moving_at)
        assert moving_at < downloaded_at < log.index(f"now serving stage {target}", moving_at)

        # the records: the mover serves the target, the stage it left kept two serving peers
        records = wait_for(lambda: (s := serving(swarm)).get(mover) is not None and s[mover].stage == target and s,
                           60, "the mover's record on its new stage")
        assert sum(1 for r in records.values() if r.stage == source) >= 2
        assert {r.stage for r in records.values()} == {0, 1}

        # training goes on through the new assignment, and the mover serves microbatches there (the
        # trainer's routing takes a moved peer as a fresh, idle one on its new stage: it is tried soon)
        samples, served = trainer_samples(swarm), served_by(swarm, mover)
        wait_for(lambda: trainer_samples(swarm) >= samples + 64 and served_by(swarm, mover) > served, 180,
                 "the trainer training on after the move, through the mover")
        mover_process = agents[STAGE_PEERS.index(mover)]
        mover_process.send_signal(signal.SIGTERM)  # a drain: the served count is logged as it leaves
        assert mover_process.wait(timeout=60) == 0
        served = re.search(rf"stage {target}: drained after (\d+) microbatch calls", log_of(tmp_path, mover))
        assert served is not None and int(served[1]) > 0
    finally:
        swarm.shutdown()
