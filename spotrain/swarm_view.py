"""The controller's window on the training swarm: its own hivemind DHT peer.

The peer has the controller's stable identity and the cluster key (spotrain/access.py): it signs
the admission and duty records, its process refuses peers that are not admitted (the gate of
agents/admission.py, installed before the DHT's process forks), and it counts a status only when
the admitted peer of that instance signed it.

Every call into the DHT's process is bounded (DHT_CALL_TIMEOUT_SECONDS) and first checks that the
process lives: a DHT process killed with the controller's process group (SIGTERM to a foreground
`spotrain launch`), or by the OOM killer, turns each call into SwarmUnavailable instead of a tick
blocked forever on an answer that never comes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import TYPE_CHECKING

from spotrain.agents.admission import Gate, current, install
from spotrain.contracts.admission import admission_key, owner_marker
from spotrain.contracts.records import DUTY_TTL_SECONDS, AgentStatus, duty_key, newest_statuses, status_key
from spotrain.contracts.stage_records import StageRecord, found_stage_records, stages_key
from spotrain.orphans import die_with_parent

if TYPE_CHECKING:
    from spotrain.access import ClusterAccess

# Read when hivemind is first imported. Its futures share a few bytes with the DHT's process; the
# default "file_system" strategy routes that through torch's shm manager daemon, which the
# controller does not need (inherited descriptors do) and which a SIGKILLed predecessor can leave
# half-gone.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

DHT_CALL_TIMEOUT_SECONDS = 10.0


class SwarmUnavailable(RuntimeError):
    """The controller's DHT process is gone or did not answer in time."""


class SwarmView:
    def __init__(self, cluster: str, access: ClusterAccess, initial_peers: Sequence[str] = (),
                 host: str = "127.0.0.1", client_mode: bool = False):
        from hivemind.dht.crypto import RSASignatureValidator

        self.cluster = cluster
        self.access = access
        self.client_mode = client_mode  # behind NAT: it dials agents, nobody dials it
        # before the DHT's process forks: it inherits the gate, which reads the newest admission record
        self.gate = Gate(access.record_path, cluster, access.public_key, access.controller_peer_id)
        install(self.gate)
        # hivemind merges one RSASignatureValidator per DHT: the cluster key's signs what this peer
        # stores under the cluster key's owner marker, and verifies every owner's signature (the agents')
        options = dict(host_maddrs=[f"/ip4/{host}/tcp/0"], start=True,
                       identity_path=str(access.controller_identity_path),
                       record_validators=[RSASignatureValidator(access.hivemind_key())],
                       ensure_bootstrap_success=False,  # agents we knew may have gone while we were down
                       client_mode=client_mode)
        try:
            self.dht = _orphan_safe_dht_class()(initial_peers=list(initial_peers), **options)
        except Exception:  # p2pd refuses to start when no bootstrap peer answers: alone, the loop joins agents later
            self.dht = _orphan_safe_dht_class()(initial_peers=[], **options)

    def alive(self) -> bool:
        return self.dht.is_alive()

    def _answer(self, call: Callable):
        """The result of `call(return_future=True)`, within DHT_CALL_TIMEOUT_SECONDS."""
        if not self.dht.is_alive():
            raise SwarmUnavailable(f"the controller's DHT process has exited (code {self.dht.exitcode})")
        future = call(return_future=True)
        try:
            return future.result(timeout=DHT_CALL_TIMEOUT_SECONDS)
        except (FutureTimeout, TimeoutError):  # one class from Python 3.11 on
            future.cancel()
            state = "answered nothing" if self.dht.is_alive() else f"exited (code {self.dht.exitcode})"
            raise SwarmUnavailable(f"the controller's DHT process {state} "
                                   f"within {DHT_CALL_TIMEOUT_SECONDS:.0f}s") from None

    def addresses(self) -> list[str]:
        """Where agents can bootstrap from this peer: nowhere when it is a client."""
        if self.client_mode:
            return []
        return [str(a) for a in self._answer(partial(self.dht.run_coroutine, _visible_maddrs))]

    def join(self, peers: Sequence[str]) -> int:
        """Ping these peers into the routing table (a peer that started alone, or agents that came up
        after this peer found nobody); returns how many answered."""
        from spotrain.agents.swarm_join import ping_peers

        return self._answer(partial(self.dht.run_coroutine, partial(ping_peers, list(peers))))

    def statuses(self) -> dict[str, AgentStatus]:
        """The newest status of every admitted agent whose record has not expired, signed by its own key."""
        found = self._answer(partial(self.dht.get, status_key(self.cluster), latest=True))
        return newest_statuses(found, time.time(), self.gate.peers())

    def stage_records(self) -> list[StageRecord]:
        """Every well-formed stage record the DHT holds (the loop keeps each peer's newest)."""
        found = self._answer(partial(self.dht.get, stages_key(self.cluster), latest=True))
        return found_stage_records(found)

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        from hivemind.utils.timed_storage import get_dht_time

        now = get_dht_time()
        record = self.access.sign_duty(tuple(instance_ids), now, DUTY_TTL_SECONDS)
        self._answer(partial(self.dht.store, duty_key(self.cluster), record, now + DUTY_TTL_SECONDS,
                             subkey=owner_marker(self.access.public_key)))

    def publish_admission(self, record: dict, expires: float) -> None:
        """Hand a signed admission record (ClusterAccess.sign_admission) to this process's gate (and its
        DHT process's), and store it for the agents' gates: before a new VM launches, and every tick."""
        self.gate.accept(record)
        self._answer(partial(self.dht.store, admission_key(self.cluster), record, expires,
                             subkey=owner_marker(self.access.public_key)))

    def shutdown(self) -> None:
        self.dht.shutdown()
        if current() is self.gate:
            install(None)  # this process may host another cluster's peers next (tests do)


async def _visible_maddrs(_dht, node) -> list:
    """Run inside the DHT's process (DHT.run_coroutine): the addresses other peers can reach it at."""
    return await node.get_visible_maddrs()


def _orphan_safe_dht_class():
    import hivemind

    class OrphanSafeDHT(hivemind.DHT):
        """hivemind's DHT, whose forked process (and its p2pd) ends when the controller dies."""

        def run(self) -> None:
            die_with_parent()
            super().run()

    return OrphanSafeDHT
