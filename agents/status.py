"""Publishes this agent's signed status record, reads its checkpoint duty (signed by the cluster
key) and the newest admission record (for the gate of every process of this agent) from the DHT."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.timed_storage import get_dht_time

from spotrain.agents.admission import Gate
from spotrain.agents.log import log
from spotrain.contracts.admission import newest_duty
from spotrain.contracts.records import STATUS_TTL_SECONDS, AgentStatus, duty_key, status_key


class StatusPublisher:
    """Every `period` seconds: store `snapshot()` in the DHT, refresh whether we hold duty."""

    def __init__(self, dht: DHT, cluster: str, instance_id: str, snapshot: Callable[[], AgentStatus],
                 gate: Gate | None, period: float = 2.0):
        self.dht = dht
        self.cluster = cluster
        self.instance_id = instance_id
        self.snapshot = snapshot
        self.period = period
        self.gate = gate  # None: no admission, so no duty record can be trusted
        # the process-wide key, which hivemind.Optimizer signs with too: the VM's libp2p identity's
        # (agents/admission.py: use_identity), so the subkey's owner is this agent's admitted peer id
        validator = RSASignatureValidator()
        dht.add_validators([validator])
        self.subkey = instance_id.encode() + validator.local_public_key
        self.has_duty = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def publish_now(self) -> None:
        status = self.snapshot()
        self.dht.store(status_key(self.cluster), subkey=self.subkey, value=status.to_record(),
                       expiration_time=get_dht_time() + STATUS_TTL_SECONDS)

    def refresh_duty(self) -> None:
        if self.gate is None:
            return
        duty = newest_duty(self.dht.get(duty_key(self.cluster), latest=True), self.gate.cluster_key, self.cluster,
                           time.time())
        self.has_duty = duty is not None and self.instance_id in duty.holders

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.publish_now()
                if self.gate is not None:
                    self.gate.refresh(self.dht)
                self.refresh_duty()
            except Exception as error:  # a DHT hiccup must not stop training
                log(f"status publish failed: {type(error).__name__}: {error}")
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))


__all__ = ["StatusPublisher"]
