"""Publishes this agent's signed status record and reads its checkpoint duty from the DHT."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.timed_storage import get_dht_time

from spotrain.agents.log import log
from spotrain.contracts.records import STATUS_TTL_SECONDS, AgentStatus, duty_holders, duty_key, status_key


class StatusPublisher:
    """Every `period` seconds: store `snapshot()` in the DHT, refresh whether we hold duty."""

    def __init__(self, dht: DHT, cluster: str, instance_id: str, snapshot: Callable[[], AgentStatus],
                 period: float = 2.0):
        self.dht = dht
        self.cluster = cluster
        self.instance_id = instance_id
        self.snapshot = snapshot
        self.period = period
        validator = RSASignatureValidator()  # the process-wide key hivemind.Optimizer signs with too
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
        self.has_duty = self.instance_id in duty_holders(self.dht.get(duty_key(self.cluster), latest=True))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.publish_now()
                self.refresh_duty()
            except Exception as error:  # a DHT hiccup must not stop training
                log(f"status publish failed: {type(error).__name__}: {error}")
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))


__all__ = ["StatusPublisher"]
