"""The simulated fleet's training progress, read by the controller as it reads the real swarm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.market import Location
from spotrain.sim.clock import SimClock
from spotrain.sim.pipeline import SimStages, peer_id
from spotrain.sim.provider import SimInstance, SimProvider
from spotrain.throughput import TaskProfile, Worker, estimate


class SimSwarm:
    """Training progress of the simulated fleet: workers train once booted (startup_seconds after
    launch) at the pace the throughput model gives the whole placement; in swarm mode (`stages`)
    at the pace of the pipeline its stage peers form (`sim/pipeline.py`), counted by its trainers."""

    def __init__(self, provider: SimProvider, profile: TaskProfile, clock: SimClock, startup_seconds: float,
                 stages: int = 0):
        self.provider, self.profile, self.clock, self.startup = provider, profile, clock, startup_seconds
        self.samples: dict[str, float] = {}
        self.rate: dict[str, float] = {}
        self.total = 0.0
        self.pipeline = SimStages(stages) if stages else None

    def _training(self, at: float) -> list[SimInstance]:
        return [i for i in self.provider.running() if at - i.instance.launched_at >= self.startup]

    def advance(self, seconds: float) -> None:
        """Progress over the next `seconds` with the fleet as it is now."""
        training = self._training(self.clock.now())
        if self.pipeline is not None:
            self._advance_pipeline(self.pipeline, training, seconds)
            return
        workers = [Worker(Location.parse(i.instance.location), i.offer.gpu, i.offer.gpu_count) for i in training]
        fleet_rate = estimate(workers, self.profile).samples_per_second
        compute = sum(self.profile.rate(w.gpu, w.gpu_count) for w in workers) or 1.0
        self.rate = {}
        for item, worker in zip(training, workers):
            share = fleet_rate * self.profile.rate(worker.gpu, worker.gpu_count) / compute
            self._credit(item.instance.instance_id, share, seconds)
        self.total += fleet_rate * seconds

    def _advance_pipeline(self, pipeline: SimStages, training: list[SimInstance], seconds: float) -> None:
        ordered = sorted(training, key=lambda i: (i.instance.launched_at, i.instance.request_id))
        pipeline.update([(i.instance.instance_id, self.profile.rate(i.offer.gpu, i.offer.gpu_count))
                         for i in ordered if i.role != "trainer"], self.clock.now())
        trainers = [i for i in ordered if i.role == "trainer"]
        pace = pipeline.pace() if trainers else 0.0
        self.rate = {}
        for item in trainers:
            self._credit(item.instance.instance_id, pace / len(trainers), seconds)
        self.total += pace * seconds

    def _credit(self, instance_id: str, rate: float, seconds: float) -> None:
        self.rate[instance_id] = rate
        self.samples[instance_id] = self.samples.get(instance_id, 0.0) + rate * seconds

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
                                             rate, None, 0, 0, None, (f"/sim/p2p/{peer_id(i.instance_id)}",), at,
                                             role=item.role or "")
        return out

    def addresses(self) -> list[str]:
        return []

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        pass

    def stage_records(self) -> list[StageRecord]:
        """Swarm mode: a record per stage peer still running, fresh (a live peer refreshes its own
        every 2 s)."""
        if self.pipeline is None:
            return []
        running = {i.instance.instance_id for i in self.provider.running()}
        return [replace(r, time=self.clock.now()) for i, r in self.pipeline.records.items() if i in running]
