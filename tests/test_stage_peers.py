"""Which stage peers a SWARM trainer routes to (pure: records in, peers out)."""

from __future__ import annotations

import os

from hivemind.p2p import PeerID

from spotrain.agents.roles.swarm_trainer import serving_peers
from spotrain.agents.stage_directory import FRESH_SECONDS
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState

NOW = 1000.0


def peer_id() -> str:
    return PeerID(os.urandom(34)).to_base58()  # any bytes make an ID the trainer can dial by


def record(stage: int, peer: str, age: float, state: AgentState = AgentState.TRAINING) -> StageRecord:
    return StageRecord(stage=stage, peer_id=peer, instance_id=f"i-{peer[-6:]}", samples_per_second=5.0, queue=0,
                       state=state, time=NOW - age)


def test_a_peer_whose_record_went_stale_gets_no_more_calls_while_its_stage_has_a_fresh_one():
    live, killed, joining, other = (peer_id() for _ in range(4))
    records = [record(0, live, 1.0), record(0, killed, FRESH_SECONDS + 5), record(0, joining, 0.5, AgentState.STARTING),
               record(1, other, 2.0)]
    by_stage = serving_peers(records, NOW)
    assert [p.to_base58() for p in by_stage[0]] == [live]
    assert [p.to_base58() for p in by_stage[1]] == [other]


def test_a_stage_whose_records_are_all_stale_keeps_its_peers_rather_than_stopping_the_pipeline():
    slow, slower = peer_id(), peer_id()
    by_stage = serving_peers([record(2, slow, FRESH_SECONDS + 1), record(2, slower, FRESH_SECONDS + 20)], NOW)
    assert sorted(p.to_base58() for p in by_stage[2]) == sorted([slow, slower])
