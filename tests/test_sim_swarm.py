"""The simulator's SWARM mode: stages modelled with the agents' own pure functions, the pipeline
as fast as its slowest stage, driven by the real ControlLoop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import agent_config
from hypothesis import given, settings
from hypothesis import strategies as st

from spotrain.agents.pipeline.balance import best_move, pipeline_throughput
from spotrain.config import ClusterSpec
from spotrain.contracts.stage_records import MIN_PEERS_PER_STAGE
from spotrain.contracts.states import LaunchReason
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
from spotrain.policies import get_policy
from spotrain.providers.base import LaunchRequest
from spotrain.sim.clock import SimClock
from spotrain.sim.engine import STARTUP_SECONDS, Job, fleet_pace, simulate
from spotrain.sim.pipeline import SimStages, swarm_pace
from spotrain.sim.provider import SimProvider
from spotrain.sim.swarm import SimSwarm
from spotrain.sim.traces import load_traces
from spotrain.status_fleet import workers_of

TASKS = {2: "spotrain.examples.tiny_gpt_pipeline:task_2stage", 3: "spotrain.examples.tiny_gpt_pipeline:task"}


def synthetic(tmp_path: Path, zone: str, capacity: list[int], gap: int = 600) -> Path:
    path = tmp_path / f"{zone}_v100_1.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap}, "data": capacity}))
    return path


def swarm_spec(workers: int = 5, stages: int = 2, trainers: int = 1, budget: float = 1000.0) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "sim", "budget": {"total_usd": budget}, "placement": {"workers": workers},
        "training": {"mode": "swarm", "task": TASKS[stages], "pipeline": {"stages": stages, "trainers": trainers}}})


def test_newcomers_fill_the_stages_and_the_pipeline_runs_at_its_slowest_stage():
    model = SimStages(2)
    model.update([("a", 10.0), ("b", 10.0), ("c", 10.0)], 0.0)
    counts = sorted(sum(1 for r in model.records.values() if r.stage == s) for s in range(2))
    assert counts == [1, 2]
    assert model.pace() == pytest.approx(20.0)  # one peer of 10 samples/s on the whole model: 20 on half of it
    model.update([("a", 10.0), ("b", 10.0), ("c", 10.0), ("d", 10.0)], 1.0)
    assert model.pace() == pytest.approx(40.0)
    lone = next(i for i in "abc" if sum(1 for r in model.records.values()
                                        if r.stage == model.records[i].stage) == 2)
    model.update([(i, 10.0) for i in "abcd" if i != lone], 2.0)  # a preemption: its stage has one peer
    assert model.pace() == pytest.approx(20.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1.0, 50.0), min_size=1, max_size=12), st.integers(2, 4))
def test_the_modelled_swarm_settles_as_the_agents_would(rates, stages):
    model = SimStages(stages)
    model.update([(f"p{i}", rate) for i, rate in enumerate(rates)], 0.0)
    records = list(model.records.values())
    assert best_move(records, stages) is None  # no move the agents would still make
    assert model.pace() == pipeline_throughput(records, stages)
    counts = [sum(1 for r in records if r.stage == s) for s in range(stages)]
    if len(rates) >= MIN_PEERS_PER_STAGE * stages:  # enough peers: no stage is one preemption from stopping
        assert min(counts) >= MIN_PEERS_PER_STAGE


def test_the_nominal_pace_of_a_swarm_counts_its_stage_peers_only(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [8] * 10)])
    spec = swarm_spec(workers=5)
    rate = spec.task_profile().rate("V100")
    assert fleet_pace(spec, traces) == pytest.approx(swarm_pace(4, rate, 2)) == pytest.approx(4 * rate)
    assert fleet_pace(spec, traces, 1) == 0.0  # a trainer alone trains nothing


def test_a_simulated_swarm_trains_through_its_trainers_and_replaces_a_lost_stage_peer(tmp_path):
    # room for the five VMs for 2 hours, then for four during half an hour, then for five again
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [5] * 12 + [4] * 3 + [5] * 129)])
    spec = swarm_spec(workers=5)
    pace = fleet_pace(spec, traces)  # 2 stages x 2 peers: 4 peers' worth
    lines: list[str] = []
    result = simulate(spec, traces, "spread-cheapest", Job(pace * 3600 * 4, 20), say=lines.append)
    assert result.finished and not result.over_budget and result.preemptions == 1
    # the newest VM, a stage peer, is preempted at 2 h: its stage has one peer, the pipeline runs at
    # half its pace until the replacement launched at 2.5 h has booted; simulated hours, one tick of slack
    boot = STARTUP_SECONDS / 3600
    assert result.hours == pytest.approx(boot + 4 + (0.5 + boot) / 2, abs=120 / 3600)
    assert result.stage_peer_launches == 0  # the replacement was on its way, and it filled that stage
    assert any("spot, replacement" in line for line in lines)


def test_the_pipeline_trains_only_while_a_trainer_is_booted(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [8] * 72)])
    clock = SimClock(0.0)
    provider = SimProvider(traces, clock)
    offer = next(o for o in provider.offers() if o.market == "spot")
    swarm = SimSwarm(provider, swarm_spec().task_profile(), clock, startup_seconds=60.0, stages=2)

    def launch(n: int, role: str) -> None:
        config = agent_config(mode="swarm", pipeline={"role": role, "stages": 2}, task=TASKS[2], training={
            "batch_size": 4, "target_batch_size": 64, "matchmaking_time": 2.0, "averaging_timeout": 10.0,
            "compression": {"gradients": "none", "state": "none", "activations": "blockwise8"}})
        provider.launch(LaunchRequest(f"r{n}", "sim", offer, config))

    for n in range(4):
        launch(n, "stage")
    clock.advance(60.0)
    swarm.advance(60.0)
    assert swarm.total == 0.0 and len(swarm.stage_records()) == 4  # four peers serve, nobody feeds them
    launch(4, "trainer")
    clock.advance(60.0)
    swarm.advance(60.0)
    rate = swarm_spec().task_profile().rate(offer.gpu)
    assert swarm.total == pytest.approx(4 * rate * 60.0)
    statuses = swarm.statuses()
    assert statuses["sim-r4"].samples == int(swarm.total) and statuses["sim-r4"].role == "trainer"
    assert all(statuses[f"sim-r{n}"].samples == 0 and statuses[f"sim-r{n}"].role == "stage" for n in range(4))


def test_the_controller_reads_the_simulated_stages_as_it_reads_live_ones(tmp_path):
    traces = load_traces([synthetic(tmp_path, "us-east-1a", [8] * 72)])
    spec = swarm_spec(workers=5)
    spec = spec.model_copy(update={"placement": spec.placement.model_copy(  # as simulate() places it
        update={"locations": ("aws:us-east-1a",), "gpu": ()})})
    clock = SimClock(0.0)
    provider = SimProvider(traces, clock)
    swarm = SimSwarm(provider, spec.task_profile(), clock, startup_seconds=240.0, stages=2)
    ledger = Ledger(":memory:")
    run = ledger.open_run(1000.0, json.loads(spec.model_dump_json()), 0.0)
    loop = ControlLoop(spec, ledger, run, provider, swarm, LoopSettings(tick_seconds=120.0), clock=clock.now,
                       say=lambda _: None, policy=get_policy("spread-cheapest", spec.task_profile()))
    loop.tick()
    for _ in range(3):
        swarm.advance(120.0)
        clock.advance(120.0)
        loop.tick()
    rate = spec.task_profile().rate(provider.offers()[0].gpu)
    # each stage peer's record is believed: its status announced its peer id
    assert loop.stages == [{"stage": stage, "peers": 2, "samples_per_second": 4 * rate, "domains": ["aws:us-east-1"]}
                           for stage in (0, 1)]  # the zone's region, from the controller's instance list
    assert not [row for row in ledger.instances(run_id=run.id) if row.reason == LaunchReason.STAGE_PEERS]
    # `status` reads each VM's role from the ledger: the trainer, and the stage each peer serves
    roles = sorted(w["role"] for w in workers_of(ledger, run))
    assert roles == ["stage 0", "stage 0", "stage 1", "stage 1", "trainer"]
    served = {r.instance_id: f"stage {r.stage}" for r in loop.stage_records}
    assert all(served.get(w["instance_id"], "trainer") == w["role"] for w in workers_of(ledger, run))
    assert len(ledger.events(run.id, kinds=("roles",))) == 2  # named at launch, then serving: only changes
    ledger.close()
