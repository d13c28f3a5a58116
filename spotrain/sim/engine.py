"""Run one simulated job: the real ControlLoop (and so reconcile, the planner and the budget
guard) over a replayed market, on a simulated clock."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

from spotrain.config import ClusterSpec
from spotrain.contracts.states import InstanceState, LaunchReason
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
from spotrain.policies import get_policy
from spotrain.sim.clock import SimClock
from spotrain.sim.pipeline import swarm_pace
from spotrain.sim.provider import SimProvider
from spotrain.sim.swarm import SimSwarm
from spotrain.sim.traces import LocationTrace
from spotrain.throughput import Worker, estimate

STARTUP_SECONDS = 360.0  # boot, install, load state from peers or a checkpoint


@dataclass(frozen=True)
class SimResult:
    policy: str
    finished: bool
    missed_deadline: bool
    hours: float
    spent_usd: float
    samples: float
    cost_per_million_samples_usd: float | None
    preemptions: int
    over_budget: bool
    stage_peer_launches: int = 0  # swarm mode: VMs the controller launched for a stage under two peers

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    target_samples: float
    deadline_hours: float
    start_offset: float = 0.0  # where in the traces the job starts, seconds


def fleet_pace(spec: ClusterSpec, traces: list[LocationTrace], workers: int | None = None) -> float:
    """Samples/s of the wanted workers (or `workers`) in one zone of the traces' GPU: the job's
    nominal pace."""
    from spotrain.market import Location

    count = spec.placement.workers if workers is None else workers
    if spec.training.mode == "swarm":  # the trainers feed the pipeline the others form
        pipeline = spec.training.pipeline
        rate = spec.task_profile().rate(traces[0].gpu)
        return swarm_pace(count - pipeline.trainers, rate, pipeline.stages) if count > pipeline.trainers else 0.0
    fleet = [Worker(Location.parse(traces[0].location), traces[0].gpu)] * count
    return estimate(fleet, spec.task_profile()).samples_per_second


def default_job(spec: ClusterSpec, traces: list[LocationTrace]) -> Job:
    """The spec's job, or one derived from the traces: half the horizon (at most a week) as the
    deadline, and half of that as the work of the wanted workers at their nominal pace."""
    horizon = min(t.horizon for t in traces)
    deadline = spec.budget.deadline_hours or min(horizon / 3600.0 / 2, 168.0)
    target: float | None = spec.training.target_samples
    if target is None:
        target = fleet_pace(spec, traces) * deadline * 3600.0 / 2
    return Job(float(target), float(deadline))


class Progress(Protocol):
    """Where a long comparison reports how far it is (the CLI draws bars on stderr)."""

    def start(self, policy: str) -> None: ...

    def update(self, fraction: float) -> None: ...


class NoProgress:
    def start(self, policy: str) -> None:
        pass

    def update(self, fraction: float) -> None:
        pass


def simulate(spec: ClusterSpec, traces: list[LocationTrace], policy_name: str, job: Job,
             tick_seconds: float = 120.0, startup_seconds: float = STARTUP_SECONDS,
             say=lambda _: None, progress: Progress | None = None) -> SimResult:
    clock = SimClock(0.0)
    provider = SimProvider(traces, clock, job.start_offset)
    locations = tuple(t.location for t in traces)
    sim_spec = spec.model_copy(update={
        "training": spec.training.model_copy(update={"target_samples": int(job.target_samples)}),
        "budget": spec.budget.model_copy(update={"deadline_hours": job.deadline_hours}),
        "placement": spec.placement.model_copy(update={"locations": locations, "gpu": ()}),
    })
    profile = sim_spec.task_profile()
    stages = spec.training.pipeline.stages if spec.training.mode == "swarm" else 0
    swarm = SimSwarm(provider, profile, clock, startup_seconds, stages)
    ledger = Ledger(":memory:")
    run = ledger.open_run(spec.budget.total_usd, json.loads(sim_spec.model_dump_json()), clock.now())
    loop = ControlLoop(sim_spec, ledger, run, provider, swarm, LoopSettings(tick_seconds=tick_seconds),
                       say=lambda m: say(f"{clock.now() / 3600:7.2f}h {m}"), clock=clock.now,
                       policy=get_policy(policy_name, profile))
    horizon = min(t.horizon for t in traces) - job.start_offset
    finished_at = None
    loop.tick()
    while not loop.ended.is_set() and clock.now() < horizon:
        swarm.advance(tick_seconds)
        clock.advance(tick_seconds)
        if finished_at is None and swarm.total >= job.target_samples:
            finished_at = clock.now()
        loop.tick()
        if progress is not None:
            progress.update(min(1.0, clock.now() / horizon))
    if not loop.ended.is_set():
        loop.finish("trace ended")
    spent = ledger.spent(run.id)
    preemptions = len(ledger.instances(states=(InstanceState.PREEMPTED,), run_id=run.id))
    stage_launches = len([row for row in ledger.instances(run_id=run.id) if row.reason == LaunchReason.STAGE_PEERS])
    ledger.close()
    end = finished_at if finished_at is not None else clock.now()
    finished = finished_at is not None
    return SimResult(
        policy=policy_name, finished=finished,
        missed_deadline=not finished or end > job.deadline_hours * 3600.0,
        hours=end / 3600.0, spent_usd=spent, samples=min(swarm.total, job.target_samples) if finished else swarm.total,
        cost_per_million_samples_usd=spent / swarm.total * 1e6 if swarm.total else None,
        preemptions=preemptions, over_budget=spent > spec.budget.total_usd + 1e-9,
        stage_peer_launches=stage_launches,
    )


def compare(spec: ClusterSpec, traces: list[LocationTrace], policies: list[str], job: Job,
            tick_seconds: float = 120.0, progress: Progress | None = None) -> list[dict]:
    """Every policy on the same job and traces; `oracle` is the offline optimum."""
    from spotrain.sim.oracle import oracle_cost

    progress = progress or NoProgress()
    results = []
    for name in policies:
        progress.start(name)
        if name == "oracle":
            workers = spec.placement.workers + spec.placement.backups  # backups train too
            rates = [fleet_pace(spec, traces, k) for k in range(workers + 1)]  # one zone, with communication
            best = oracle_cost(traces, rates[1], job.target_samples, job.deadline_hours, workers,
                               tick_seconds, STARTUP_SECONDS, job.start_offset, fleet_rate=rates)
            done = best.spent_usd != float("inf")
            results.append(SimResult("oracle", done, not done, best.hours, best.spent_usd, job.target_samples,
                                     best.spent_usd / job.target_samples * 1e6 if done else None, 0,
                                     best.spent_usd > spec.budget.total_usd).to_json() | {"exact": best.exact})
            progress.update(1.0)
        else:
            results.append(simulate(spec, traces, name, job, tick_seconds, progress=progress).to_json())
    return results
