"""Refuse to train beside peers whose codec table differs from ours.

Each agent publishes its codec-table fingerprint in its status record (`AgentStatus.codec_table`)
before it builds its optimizer, then reads every live record of the cluster: a peer with another
fingerprint (another wire version, codec table, or choice of codecs) could not decode our tensors
nor we its, so the agent stops at join with a message naming both tables.
"""

from __future__ import annotations

from hivemind import DHT

from spotrain.contracts.records import newest_statuses, status_key

EXIT_CODEC_MISMATCH = 78  # sysexits' EX_CONFIG: restarting will not help


class CodecTableMismatch(RuntimeError):
    pass


def peer_codec_tables(dht: DHT, cluster: str) -> dict[str, str]:
    """instance id -> codec table of every agent whose status record is live."""
    statuses = newest_statuses(dht.get(status_key(cluster), latest=True))
    return {instance: status.codec_table for instance, status in statuses.items()}


def check_codec_table(dht: DHT, cluster: str, instance_id: str, ours: str) -> None:
    """Raise CodecTableMismatch if any other live agent of the cluster publishes another table."""
    for peer, theirs in sorted(peer_codec_tables(dht, cluster).items()):
        if peer != instance_id and theirs != ours:
            raise CodecTableMismatch(
                f"codec table mismatch: peer {peer} uses {theirs or '(none published)'}, this agent {ours}; "
                "every agent of a cluster needs the same spotrain version and training.compression")
