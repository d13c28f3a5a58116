"""The SWARM stage records in the DHT: a stage peer publishes its own signed record, every peer
(and the controller) reads them all (`<cluster>.stages`, one subkey per peer, as status records)."""

from __future__ import annotations

import time
from typing import Any

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.timed_storage import get_dht_time

from spotrain.contracts.stage_records import (
    STAGE_TTL_SECONDS,
    StageRecord,
    found_stage_records,
    latest_records,
    stages_key,
)
from spotrain.contracts.states import AgentState

PUBLISH_SECONDS = 2.0  # how often a serving stage peer refreshes its record
# a serving record not refreshed for this long is a peer gone without notice: it counts for nothing
# in joins, moves, duty and routing (the DHT keeps records for STAGE_TTL_SECONDS, too long to react
# to a kill: trainers kept routing to a killed peer for 30 s, and replacements joined the wrong stage)
FRESH_SECONDS = 5 * PUBLISH_SECONDS


def publish_stage_record(dht: DHT, cluster: str, record: StageRecord) -> None:
    """Store `record` under this agent's signed subkey (only this process's key can overwrite it)."""
    validator = RSASignatureValidator()  # the process-wide key the status records are signed with
    subkey = record.instance_id.encode() + validator.local_public_key
    dht.store(stages_key(cluster), subkey=subkey, value=record.to_record(),
              expiration_time=get_dht_time() + STAGE_TTL_SECONDS)


def read_stage_records(dht: DHT, cluster: str) -> list[StageRecord]:
    """The newest unexpired record of each stage peer, by stage and peer id."""
    return latest_records(found_stage_records(dht.get(stages_key(cluster), latest=True)), time.time())


def is_fresh(record: StageRecord, now: float) -> bool:
    """False for a `training` record not refreshed within FRESH_SECONDS; other states keep their
    first time on purpose (a joining peer's `starting` record is stamped with its join time)."""
    return record.state != AgentState.TRAINING or now - record.time <= FRESH_SECONDS


async def _known_peers(dht: object, node: Any) -> int:
    """Run in the DHT's process: the DHT servers this peer knows (DHT clients never enter the table)."""
    return len(node.protocol.routing_table.peer_id_to_uid)


def wait_for_another_peer(dht: DHT, timeout: float, poll: float = 1.0) -> float | None:
    """Seconds until this DHT peer knows another one, None if `timeout` passed first.

    Agents booted together behind a NAT'd controller each start the swarm alone and become one only
    when they ping the peers the controller publishes (`swarm_join.keep_merged`); a stage peer that
    chose its stage before that saw no other record and every one of them picked the same stage."""
    started = time.monotonic()
    while dht.run_coroutine(_known_peers) == 0:
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(poll)
    return time.monotonic() - started
