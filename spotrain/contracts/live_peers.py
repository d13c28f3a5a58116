"""Where the controller publishes the live swarm's peers for each VM, and in what form.

An agent whose launch-time `initial_peers` no longer answer reads these through its metadata
service: an EC2 instance tag (IMDS shows tags when instance metadata tags are enabled), a GCE
metadata attribute, the local VM's IMDS (served from a file its provider rewrites each tick).
"""

from __future__ import annotations

from collections.abc import Sequence

PEERS_TAG = "spotrain:peers"  # EC2 tag and local IMDS `tags/instance/<key>`
PEERS_ATTRIBUTE = "spotrain-peers"  # GCE `instance/attributes/<key>`
EC2_TAG_VALUE_LIMIT = 256


def peers_value(peers: Sequence[str], limit: int | None = None) -> str:
    """Space-separated multiaddrs, as many whole ones as fit in `limit` characters."""
    value = ""
    for peer in peers:
        longer = f"{value} {peer}" if value else peer
        if limit is not None and len(longer) > limit:
            break
        value = longer
    return value
