"""Which instances to revoke for poisoning the average, from the agents' status records (pure).

Each agent's poison guard counts, per sender peer id, the averaging rounds in which it dropped
that sender's parts (`AgentStatus.offenders`). A count is an accusation, and an admitted peer can
lie in its own record, so one accuser is not enough where others could confirm: an instance is
revoked when a strict majority of the other agents that report at all count at least
`threshold` offences against its peer id. With two agents each is the other's only witness, so
two that accuse each other are both revoked (the liar with them; its replacement is honest).
Wiring: the controller calls `instances_to_revoke` each tick and revokes what it returns
(`spotrain.access.revoke`, branch admission).
"""

from __future__ import annotations

from collections.abc import Mapping

from spotrain.contracts.records import AgentStatus

REVOKE_AFTER_OFFENCES = 3  # rounds with dropped parts; one can be a glitch, three in a row are not


def peer_ids_of(status: AgentStatus) -> set[str]:
    """The libp2p peer ids an agent announces (its multiaddrs end in /p2p/<peer id>)."""
    return {address.rsplit("/p2p/", 1)[1] for address in status.addresses if "/p2p/" in address}


def instances_to_revoke(statuses: Mapping[str, AgentStatus], threshold: int = REVOKE_AFTER_OFFENCES) -> list[str]:
    """The instance ids a majority of the other agents counted `threshold` offences against, sorted."""
    revoke = []
    for accused, status in statuses.items():
        peers = peer_ids_of(status)
        witnesses = [other for instance, other in statuses.items() if instance != accused]
        accusers = sum(1 for other in witnesses if any(other.offenders.get(p, 0) >= threshold for p in peers))
        if peers and witnesses and 2 * accusers > len(witnesses):
            revoke.append(accused)
    return sorted(revoke)
