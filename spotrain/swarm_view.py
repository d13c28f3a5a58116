"""The controller's window on the training swarm: its own hivemind DHT peer."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from spotrain.contracts.records import (
    DUTY_TTL_SECONDS,
    AgentStatus,
    duty_key,
    duty_record,
    newest_statuses,
    status_key,
)
from spotrain.contracts.stage_records import found_stage_records, stage_summary, stages_key
from spotrain.orphans import die_with_parent

# Read when hivemind is first imported. Its futures share a few bytes with the DHT's process; the
# default "file_system" strategy routes that through torch's shm manager daemon, which the
# controller does not need (inherited descriptors do) and which a SIGKILLed predecessor can leave
# half-gone.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")


class SwarmView:
    def __init__(self, cluster: str, initial_peers: Sequence[str] = (), host: str = "127.0.0.1"):
        from hivemind.dht.crypto import RSASignatureValidator

        self.cluster = cluster
        self.dht = _orphan_safe_dht_class()(
            initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/0"], start=True,
            record_validators=[RSASignatureValidator()],  # verifies the agents' signed status records
            ensure_bootstrap_success=False,  # agents we knew may have gone while we were down
        )

    def addresses(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def statuses(self) -> dict[str, AgentStatus]:
        """The newest status of every agent whose record has not expired."""
        return newest_statuses(self.dht.get(status_key(self.cluster), latest=True))

    def stages(self) -> list[dict[str, float]]:
        """`{stage, peers, samples_per_second}` of every stage with a serving peer, from the stage records."""
        found = self.dht.get(stages_key(self.cluster), latest=True)
        return stage_summary(found_stage_records(found), time.time())

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
