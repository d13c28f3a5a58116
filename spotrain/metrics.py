"""The controller's optional Prometheus endpoint (`controller.metrics_port`).

The figures are read from the control loop when Prometheus scrapes, not pushed each tick, so a
scrape always sees the newest tick and an idle endpoint costs nothing. It listens on 127.0.0.1
unless the spec names another address (`controller.metrics_host`): spend and fleet are nobody
else's business by default.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from spotrain.contracts.states import AgentState, InstanceState

if TYPE_CHECKING:
    from spotrain.control_loop import ControlLoop

PREFIX = "spotrain"


class LoopCollector:
    """A prometheus_client collector over one control loop's last observation."""

    def __init__(self) -> None:
        self.loop: ControlLoop | None = None  # set once the loop exists; the port is taken before

    def describe(self) -> list[Any]:
        return []  # the families depend on the loop's state: collected at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        loop = self.loop
        if loop is None:
            return
        cluster = loop.spec.name
        observed = loop.last_observed
        budget = loop.spec.budget.total_usd

        def gauge(name: str, documentation: str, value: float, unit: str = "") -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["cluster"], unit=unit)
            family.add_metric([cluster], value)
            return family

        yield gauge("budget_usd", "the run's hard budget", budget)
        if observed is None:  # before the first tick: the budget is all there is to say
            return
        burn = sum(i.price_usd_per_hour for i in observed.instances if i.state == InstanceState.RUNNING)
        burn += observed.egress_usd_per_hour  # the fleet's traffic costs money too
        yield gauge("spent_usd", "spend of this run so far (instance time and egress)", observed.spent_usd)
        yield gauge("burn_usd_per_hour", "what the fleet costs per hour now (instances and egress)", burn)
        left = (budget - observed.spent_usd) / burn * 3600.0 if burn > 0 else float("inf")
        yield gauge("budget_left_seconds", "when the budget runs out at this burn rate", max(0.0, left))
        yield gauge("global_epoch", "the swarm's epoch", observed.global_epoch)
        yield gauge("samples", "samples trained in this run", observed.samples)
        yield gauge("samples_per_second", "the fleet's training pace", observed.samples_per_second)
        yield self._workers(cluster, observed)
        yield gauge("last_tick_timestamp_seconds", "when the controller last observed its fleet",
                    loop.last_tick_at or time.time())

    @staticmethod
    def _workers(cluster: str, observed: Any) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(f"{PREFIX}_workers", "running instances by location and agent state",
                                   labels=["cluster", "location", "state"])
        counts: dict[tuple[str, str], int] = {}
        for instance in observed.instances:
            if instance.state != InstanceState.RUNNING:
                continue
            state = AgentState(instance.agent_state).value if instance.agent_state else "unheard"
            counts[(instance.location, state)] = counts.get((instance.location, state), 0) + 1
        for (location, state), count in sorted(counts.items()):
            family.add_metric([cluster, location, state], count)
        return family


def _closed_in_forked_children(server: Any) -> None:
    """A process forked from the controller (hivemind's DHT is a ForkProcess, started after the port
    is taken) closes its copy of the listening socket at once: only the controller holds the port, so
    a child that outlives it cannot keep the port taken (Python's sockets are closed on exec already;
    a fork copies every descriptor). Only a weak reference is kept: the handler stays registered."""
    held = weakref.ref(server)

    def close_copy() -> None:
        copy = held()
        if copy is not None:
            copy.socket.close()  # the child's descriptor only; the parent's stays open and serving

    os.register_at_fork(after_in_child=close_copy)


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes. It takes its port first (a busy port stops a launch before
    anything is written), then serves the loop given to `serve`; `close()` stops it."""

    def __init__(self, host: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        self.collector = LoopCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            from spotrain.errors import SpotrainError

            raise SpotrainError(f"controller.metrics_port: cannot listen on {host}:{port}: "
                                f"{error.strerror or error}") from None
        _closed_in_forked_children(self.server)

    def serve(self, loop: ControlLoop) -> None:
        self.collector.loop = loop

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
