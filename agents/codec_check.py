"""Refuse to train with a codec table the swarm does not share.

A peer with another fingerprint (another wire version, codec table, or choice of codecs) could
not decode our tensors nor we its. The controller names the cluster's table in the user-data
(`AgentConfig.codec_table`): an agent whose own differs stops at join with a message naming both,
and what peers publish does not matter (a forged record cannot stop new agents). Without it (a
hand-made config), the agent compares with every live status record it trusts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from hivemind import DHT

from spotrain.contracts.records import newest_statuses, status_key

EXIT_CODEC_MISMATCH = 78  # sysexits' EX_CONFIG: restarting will not help


class CodecTableMismatch(RuntimeError):
    pass


def peer_codec_tables(dht: DHT, cluster: str, admitted: Mapping[str, str] | None) -> dict[str, str]:
    """instance id -> codec table of every agent whose status record is live (and trusted)."""
    statuses = newest_statuses(dht.get(status_key(cluster), latest=True), time.time(), admitted)
    return {instance: status.codec_table for instance, status in statuses.items()}


def check_codec_table(dht: DHT, cluster: str, instance_id: str, ours: str, expected: str | None,
                      admitted: Mapping[str, str] | None) -> None:
    """Raise CodecTableMismatch if ours is not the controller's `expected` table; without one, if any
    other live agent of the cluster publishes another table."""
    if expected is not None:
        if ours != expected:
            raise CodecTableMismatch(f"codec table mismatch: the controller uses {expected}, this agent {ours}; "
                                     "the VM needs the controller's spotrain version")
        return
    for peer, theirs in sorted(peer_codec_tables(dht, cluster, admitted).items()):
        if peer != instance_id and theirs != ours:
            raise CodecTableMismatch(
                f"codec table mismatch: peer {peer} uses {theirs or '(none published)'}, this agent {ours}; "
                "every agent of a cluster needs the same spotrain version and training.compression")
