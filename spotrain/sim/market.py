"""A replayed spot market: a Provider whose capacity and prices come from traces, on a simulated
clock, and a swarm whose progress comes from the throughput model."""

from __future__ import annotations

from dataclasses import dataclass

from spotrain.contracts.records import AgentStatus
from spotrain.market import Location, catalog
from spotrain.providers.base import CapacityError, Instance, LaunchRequest, Offer
from spotrain.sim.traces import LocationTrace, TraceError
from spotrain.throughput import TaskProfile, Worker, estimate


class SimClock:
    def __init__(self, start: float = 0.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


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
class _SimInstance:
    instance: Instance
    offer: Offer


class SimProvider:
    """Spot launches fail when the trace shows no free capacity; running spot instances beyond the
    trace's capacity are preempted (newest first); on-demand always works."""

    name = "sim"
    termination_lag_seconds = 0.0

    def __init__(self, traces: list[LocationTrace], clock: SimClock, start_offset: float = 0.0):
        self.traces = {t.location: t for t in traces}
        self.clock = clock
        self.offset = start_offset  # trace time = clock time + offset
        self.instances: dict[str, _SimInstance] = {}
        self._offers: list[Offer] = []
        for trace in traces:
            itype, spot, on_demand = catalog_prices(trace.location, trace.gpu)
            price = trace.price_at(start_offset) or spot
            provider = trace.location.split(":")[0]
            self._offers.append(Offer(provider, trace.location, itype, trace.gpu, price,
                                      on_demand_usd_per_hour=on_demand, market="spot"))
            self._offers.append(Offer(provider, trace.location, itype, trace.gpu, on_demand,
                                      on_demand_usd_per_hour=on_demand, market="on-demand"))

    def offers(self) -> list[Offer]:
        return list(self._offers)

    def _running_spot(self, location: str) -> list[_SimInstance]:
        return [i for i in self.instances.values()
                if i.instance.location == location and i.offer.market == "spot" and i.instance.state == "running"]

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
                            offer.spot_usd_per_hour, "running", now)
        self.instances[request.request_id] = _SimInstance(instance, offer)
        return instance

    def preempt_over_capacity(self) -> None:
        now = self.clock.now()
        for location, trace in self.traces.items():
            running = sorted(self._running_spot(location), key=lambda i: i.instance.launched_at)
            excess = len(running) - trace.capacity_at(now + self.offset)
            for victim in running[len(running) - max(0, excess):]:
                self._end(victim, "preempted", "spot preemption", now)

    def _end(self, item: _SimInstance, state: str, reason: str, now: float) -> None:
        i = item.instance
        item.instance = Instance(i.instance_id, i.request_id, i.cluster, i.location, i.price_usd_per_hour, state,
                                 i.launched_at, now, reason)

    def list_instances(self, cluster: str) -> list[Instance]:
        self.preempt_over_capacity()
        return [i.instance for i in self.instances.values() if i.instance.cluster == cluster]

    def terminate(self, instance_id: str) -> None:
        for item in self.instances.values():
            if item.instance.instance_id == instance_id and item.instance.state == "running":
                self._end(item, "terminated", "terminated by request", self.clock.now())

    def running(self) -> list[_SimInstance]:
        return [i for i in self.instances.values() if i.instance.state == "running"]


class SimSwarm:
    """Training progress of the simulated fleet: workers train once booted (startup_seconds after
    launch) at the pace the throughput model gives the whole placement."""

    def __init__(self, provider: SimProvider, profile: TaskProfile, clock: SimClock, startup_seconds: float):
        self.provider, self.profile, self.clock, self.startup = provider, profile, clock, startup_seconds
        self.samples: dict[str, float] = {}
        self.rate: dict[str, float] = {}
        self.total = 0.0

    def _training(self, at: float) -> list:
        return [i for i in self.provider.running() if at - i.instance.launched_at >= self.startup]

    def advance(self, seconds: float) -> None:
        """Progress over the next `seconds` with the fleet as it is now."""
        training = self._training(self.clock.now())
        workers = [Worker(Location.parse(i.instance.location), i.offer.gpu, i.offer.gpu_count) for i in training]
        fleet_rate = estimate(workers, self.profile).samples_per_second
        compute = sum(self.profile.rate(w.gpu, w.gpu_count) for w in workers) or 1.0
        self.rate = {}
        for item, worker in zip(training, workers):
            share = fleet_rate * self.profile.rate(worker.gpu, worker.gpu_count) / compute
            self.rate[item.instance.instance_id] = share
            self.samples[item.instance.instance_id] = self.samples.get(item.instance.instance_id, 0.0) + share * seconds
        self.total += fleet_rate * seconds

    def statuses(self) -> dict[str, AgentStatus]:
        """Every running agent's record, and an ended agent's last one (a DHT keeps records until they
        expire): samples trained up to a preemption still count."""
        now = self.clock.now()
        epoch = int(self.total // self.profile.target_batch_size)
        out = {}
        for item in self.provider.instances.values():
            i = item.instance
            if i.instance_id not in self.samples and i.state != "running":
                continue
            at = now if i.state == "running" else (i.ended_at or now)
            state = "training" if at - i.launched_at >= self.startup else "starting"
            rate = self.rate.get(i.instance_id, 0.0) if i.state == "running" else 0.0
            out[i.instance_id] = AgentStatus(i.instance_id, state, epoch, int(self.samples.get(i.instance_id, 0.0)),
                                             rate, None, 0, 0, None, (), at)
        return out

    def addresses(self) -> list[str]:
        return []

    def assign_duty(self, instance_ids) -> None:
        pass
