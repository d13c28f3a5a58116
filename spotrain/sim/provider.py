"""A replayed spot market: a Provider whose capacity and prices come from traces, on a simulated
clock."""

from __future__ import annotations

from dataclasses import dataclass

from spotrain.contracts.states import EndReason, InstanceState
from spotrain.market import Location, catalog
from spotrain.providers.base import CapacityError, Instance, LaunchRequest, Offer
from spotrain.sim.clock import SimClock
from spotrain.sim.traces import LocationTrace, TraceError


def catalog_prices(location: str, gpu: str | None) -> tuple[str, float, float]:
    """(instance type, spot, on-demand) for a trace location: its region's catalog row for that
    GPU, else the provider's, else any provider's."""
    loc = Location.parse(location)
    rows = [r for r in catalog() if r.gpu == gpu]
    for choose in (lambda r: r.provider == loc.provider and r.region == loc.region,
                   lambda r: r.provider == loc.provider, lambda r: True):
        match = [r for r in rows if choose(r) and (r.gpu_count == 1 or gpu is None)]
        if match:
            row = min(match, key=lambda r: r.spot_usd_per_hour)
            return row.instance_type, row.spot_usd_per_hour, row.on_demand_usd_per_hour
    raise TraceError(f"{location}: no catalog price for GPU {gpu or 'none (CPU)'}")


@dataclass
class SimInstance:
    instance: Instance
    offer: Offer
    role: str | None = None  # swarm mode: the role the controller named in its user-data


class SimProvider:
    """Spot launches fail when the trace shows no free capacity; running spot instances beyond the
    trace's capacity are preempted (newest first); on-demand always works."""

    name = "sim"
    termination_lag_seconds = 0.0

    def __init__(self, traces: list[LocationTrace], clock: SimClock, start_offset: float = 0.0):
        self.traces = {t.location: t for t in traces}
        self.clock = clock
        self.offset = start_offset  # trace time = clock time + offset
        self.instances: dict[str, SimInstance] = {}
        self._offers: list[Offer] = []
        for trace in traces:
            itype, spot, on_demand = catalog_prices(trace.location, trace.gpu)
            price = trace.price_at(start_offset) or spot
            provider = trace.location.split(":")[0]
            self._offers.append(Offer(provider, trace.location, itype, trace.gpu, price,
                                      on_demand_usd_per_hour=on_demand, market="spot"))
            self._offers.append(Offer(provider, trace.location, itype, trace.gpu, on_demand,
                                      on_demand_usd_per_hour=on_demand, market="on-demand"))

    def check_credentials(self) -> None:
        """Nothing to check: the simulated clouds need none."""

    def offers(self) -> list[Offer]:
        return list(self._offers)

    def _running_spot(self, location: str) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.instance.location == location and i.offer.market == "spot"
                and i.instance.state == InstanceState.RUNNING]

    def launch(self, request: LaunchRequest) -> Instance:
        if request.request_id in self.instances:
            return self.instances[request.request_id].instance
        offer = request.offer
        now = self.clock.now()
        if offer.market == "spot":
            trace = self.traces[offer.location]
            if len(self._running_spot(offer.location)) >= trace.capacity_at(now + self.offset):
                raise CapacityError(f"no spot capacity in {offer.location}")
        instance = Instance(f"sim-{request.request_id}", request.request_id, request.cluster, offer.location,
                            offer.spot_usd_per_hour, InstanceState.RUNNING, now)
        pipeline = request.user_data.pipeline
        self.instances[request.request_id] = SimInstance(instance, offer, pipeline.role if pipeline else None)
        return instance

    def preempt_over_capacity(self) -> None:
        now = self.clock.now()
        for location, trace in self.traces.items():
            running = sorted(self._running_spot(location), key=lambda i: i.instance.launched_at)
            excess = len(running) - trace.capacity_at(now + self.offset)
            for victim in running[len(running) - max(0, excess):]:
                self._end(victim, InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION, now)

    def _end(self, item: SimInstance, state: InstanceState, reason: EndReason, now: float) -> None:
        i = item.instance
        item.instance = Instance(i.instance_id, i.request_id, i.cluster, i.location, i.price_usd_per_hour, state,
                                 i.launched_at, now, reason)

    def list_instances(self, cluster: str) -> list[Instance]:
        self.preempt_over_capacity()
        return [i.instance for i in self.instances.values() if i.instance.cluster == cluster]

    def terminate(self, instance_id: str) -> None:
        for item in self.instances.values():
            if item.instance.instance_id == instance_id and item.instance.state == InstanceState.RUNNING:
                self._end(item, InstanceState.TERMINATED, EndReason.TERMINATED_BY_REQUEST, self.clock.now())

    def running(self) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.instance.state == InstanceState.RUNNING]
