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


def publish_stage_record(dht: DHT, cluster: str, record: StageRecord) -> None:
    """Store `record` under this agent's signed subkey (only this process's key can overwrite it)."""
    validator = RSASignatureValidator()  # the process-wide key the status records are signed with
    subkey = record.instance_id.encode() + validator.local_public_key
    dht.store(stages_key(cluster), subkey=subkey, value=record.to_record(),
              expiration_time=get_dht_time() + STAGE_TTL_SECONDS)


def read_stage_records(dht: DHT, cluster: str) -> list[StageRecord]:
    """The newest unexpired record of each stage peer, by stage and peer id."""
    return latest_records(found_stage_records(dht.get(stages_key(cluster), latest=True)), time.time())


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
