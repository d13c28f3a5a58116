"""The simulated fleet's training progress, read by the controller as it reads the real swarm."""

from __future__ import annotations

from collections.abc import Sequence

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.market import Location
from spotrain.sim.clock import SimClock
from spotrain.sim.provider import SimInstance, SimProvider
from spotrain.throughput import TaskProfile, Worker, estimate


class SimSwarm:
    """Training progress of the simulated fleet: workers train once booted (startup_seconds after
    launch) at the pace the throughput model gives the whole placement."""

    def __init__(self, provider: SimProvider, profile: TaskProfile, clock: SimClock, startup_seconds: float):
        self.provider, self.profile, self.clock, self.startup = provider, profile, clock, startup_seconds
        self.samples: dict[str, float] = {}
        self.rate: dict[str, float] = {}
        self.total = 0.0

    def _training(self, at: float) -> list[SimInstance]:
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
            running = i.state == InstanceState.RUNNING
            if i.instance_id not in self.samples and not running:
                continue
            at = now if running else (i.ended_at or now)
            state = AgentState.TRAINING if at - i.launched_at >= self.startup else AgentState.STARTING
            rate = self.rate.get(i.instance_id, 0.0) if running else 0.0
            out[i.instance_id] = AgentStatus(i.instance_id, state, epoch, int(self.samples.get(i.instance_id, 0.0)),
                                             rate, None, 0, 0, None, (), at)
        return out

    def addresses(self) -> list[str]:
        return []

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        pass

    def stages(self) -> list[dict[str, float]]:
        return []  # the simulator models data parallelism only
