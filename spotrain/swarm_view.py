"""The controller's window on the training swarm: its own hivemind DHT peer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

from spotrain.contracts.records import (
    DUTY_TTL_SECONDS,
    AgentStatus,
    duty_key,
    duty_record,
    newest_statuses,
    status_key,
)
from spotrain.orphans import die_with_parent

# Read when hivemind is first imported. Its futures share a few bytes with the DHT's process; the
# default "file_system" strategy routes that through torch's shm manager daemon, which the
# controller does not need (inherited descriptors do) and which a SIGKILLed predecessor can leave
# half-gone.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")


class SwarmView:
    def __init__(self, cluster: str, initial_peers: Sequence[str] = (), host: str = "127.0.0.1",
                 client_mode: bool = False):
        from hivemind.dht.crypto import RSASignatureValidator

        self.cluster = cluster
        self.client_mode = client_mode  # behind NAT: it dials agents, nobody dials it
        options = dict(host_maddrs=[f"/ip4/{host}/tcp/0"], start=True,
                       record_validators=[RSASignatureValidator()],  # verifies the agents' signed status records
                       ensure_bootstrap_success=False,  # agents we knew may have gone while we were down
                       client_mode=client_mode)
        try:
            self.dht = _orphan_safe_dht_class()(initial_peers=list(initial_peers), **options)
        except Exception:  # p2pd refuses to start when no bootstrap peer answers: alone, the loop joins agents later
            self.dht = _orphan_safe_dht_class()(initial_peers=[], **options)

    def addresses(self) -> list[str]:
        """Where agents can bootstrap from this peer: nowhere when it is a client."""
        return [] if self.client_mode else [str(a) for a in self.dht.get_visible_maddrs()]

    def join(self, peers: Sequence[str]) -> int:
        """Ping these peers into the routing table (a peer that started alone, or agents that came up
        after this peer found nobody); returns how many answered."""
        from spotrain.agents.swarm_join import ping_peers

        return self.dht.run_coroutine(partial(ping_peers, list(peers)))

    def statuses(self) -> dict[str, AgentStatus]:
        """The newest status of every agent whose record has not expired."""
        return newest_statuses(self.dht.get(status_key(self.cluster), latest=True))

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        from hivemind.utils.timed_storage import get_dht_time

        self.dht.store(duty_key(self.cluster), duty_record(instance_ids), get_dht_time() + DUTY_TTL_SECONDS)

    def shutdown(self) -> None:
        self.dht.shutdown()


def _orphan_safe_dht_class():
    import hivemind

    class OrphanSafeDHT(hivemind.DHT):
        """hivemind's DHT, whose forked process (and its p2pd) ends when the controller dies."""

        def run(self) -> None:
            die_with_parent()
            super().run()

    return OrphanSafeDHT
