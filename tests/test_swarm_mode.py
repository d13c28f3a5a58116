"""`training.mode: swarm` from the spec to the user-data, the roles' stage choice, stages in reports."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, agent_config, wait_for

from spotrain.agents.daemon import role_for
from spotrain.agents.pipeline.balance import stage_for_joining
from spotrain.agents.roles.data_parallel import DataParallelRole
from spotrain.agents.roles.stage_server import StageServerRole
from spotrain.agents.roles.swarm_trainer import SwarmTrainerRole
from spotrain.config import ClusterSpec
from spotrain.contracts.agent_config import AgentConfig, AgentConfigError
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.stage_records import StageRecord, stage_summary
from spotrain.contracts.states import AgentState, LaunchReason
from spotrain.contracts.task import TaskImportError, load_pipeline_task
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.errors import SpecError
from spotrain.ledger import Ledger
from spotrain.providers.local import LocalProvider
from spotrain.report import build_report
from spotrain.spec_file import load_spec

SWARM = """
name: s1
budget: {total_usd: 1.0}
training: {mode: swarm, task: "spotrain.examples.tiny_gpt_pipeline:task", pipeline: {stages: 3, trainers: 1}}
placement: {workers: 7}
"""


def test_the_swarm_example_loads():
    spec = load_spec(ROOT / "examples" / "local-swarm.yaml")
    pipeline = spec.training.pipeline
    assert spec.training.mode == "swarm" and spec.training.compression.activations == "blockwise8"
    assert spec.placement.workers >= 2 * pipeline.stages + pipeline.trainers
    assert load_pipeline_task(spec.training.task).num_stages == pipeline.stages


@pytest.mark.parametrize("old, new, expected", [
    ("workers: 7", "workers: 6",
     "placement.workers: swarm mode needs 2 peers per stage plus the trainers, at least 7 (2*3+1), got 6"),
    ("tiny_gpt_pipeline:task", "tiny_gpt:task",
     "training.task: spotrain.examples.tiny_gpt:task is not a PipelineTask (training.mode swarm needs one)"),
    ("stages: 3", "stages: 4", "training.task: spotrain.examples.tiny_gpt_pipeline:task has 3 stages, "
                               "training.pipeline.stages says 4"),
    ("mode: swarm", "mode: swarm, compression: {activations: 'powersgd:4'}",
     "training.compression.activations: unknown codec 'powersgd:4'"),
    ("trainers: 1", "trainers: 0", "training.pipeline.trainers: Input should be greater than 0"),
    ("mode: swarm", "mode: pipeline", "training.mode: Input should be 'data-parallel' or 'swarm'"),
])
def test_bad_swarm_specs_are_refused_one_line_per_problem(tmp_path, old, new, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(SWARM.replace(old, new))
    with pytest.raises(SpecError) as error:
        load_spec(path)
    lines = str(error.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)  # every problem listed, each its own line
    assert expected in lines[0]


def test_a_data_parallel_task_is_not_a_pipeline_task():
    with pytest.raises(TaskImportError, match="is not a PipelineTask"):
        load_pipeline_task("spotrain.examples.tiny_gpt:task")


def swarm_config(role: str) -> AgentConfig:
    base = agent_config(task="spotrain.examples.tiny_gpt_pipeline:task").wire()
    base["training"]["compression"]["activations"] = "blockwise8"
    return AgentConfig.model_validate({**base, "mode": "swarm", "pipeline": {"role": role, "stages": 3}})


def test_user_data_names_the_mode_and_role_and_a_data_parallel_one_reads_as_before():
    config = swarm_config("trainer")
    assert AgentConfig.from_json(config.to_json()) == config and config.wire()["mode"] == "swarm"
    assert "mode" not in agent_config().wire() and "pipeline" not in agent_config().wire()
    assert [type(role_for(c)) for c in (agent_config(), swarm_config("trainer"), swarm_config("stage"))] == [
        DataParallelRole, SwarmTrainerRole, StageServerRole]
    without = {k: v for k, v in config.wire().items() if k != "pipeline"}
    with pytest.raises(AgentConfigError, match="pipeline is given in swarm mode and only then"):
        AgentConfig.from_json(json.dumps(without))


def starting(stage: int, peer: str, joined: float) -> StageRecord:
    return StageRecord(stage, peer, "i", 0.0, 0, AgentState.STARTING, joined)


def serving(stage: int, peer: str, speed: float) -> StageRecord:
    return StageRecord(stage, peer, "i", speed, 0, AgentState.TRAINING, 0.0)


def test_peers_joining_at_once_spread_over_the_stages_in_the_order_they_began():
    peers = [f"p{i}" for i in range(6)]
    records: list[StageRecord] = []
    for index, peer in enumerate(peers):  # each sees the earlier ones' records, as after the settle
        records.append(starting(stage_for_joining(records, 3, peer, float(index)), peer, float(index)))
    assert sorted(r.stage for r in records) == [0, 0, 1, 1, 2, 2]
    # every peer decides the same from the full set of records: later joins do not move earlier ones
    assert [stage_for_joining(records, 3, r.peer_id, r.time) for r in records] == [r.stage for r in records]
    # a newcomer joins the stage that limits the pipeline; draining peers count for nothing
    fleet = [serving(0, "a", 10.0), serving(1, "b", 4.0), serving(2, "c", 10.0), serving(2, "d", 5.0)]
    assert stage_for_joining(fleet, 3, "n", 5.0) == 1
    drained = [*fleet[:1], StageRecord(0, "e", "i", 9.0, 0, AgentState.DRAINING, 0.0), serving(1, "f", 20.0)]
    assert stage_for_joining(drained, 3, "n", 5.0) == 2


@pytest.mark.parametrize("fleet", ["ABABAB", "AAABBB", "AAAABBB", "ABBBBAA"])
def test_stage_peers_of_two_regions_joining_in_any_order_give_every_stage_a_peer_in_each(fleet: str):
    """The geo SWARM demo's promise, for every order the peers of a fleet may begin to join in."""
    for order in sorted(set(itertools.permutations(fleet))):
        records: list[StageRecord] = []
        for index, region in enumerate(order):  # each sees the earlier ones' records, as after the settle
            peer = f"p{index}"
            stage = stage_for_joining(records, 3, peer, float(index), region)
            records.append(StageRecord(stage, peer, "i", 0.0, 0, AgentState.STARTING, float(index), region))
        for stage in range(3):
            assert {r.domain for r in records if r.stage == stage} == {"A", "B"}, order
        assert min(sum(r.stage == stage for r in records) for stage in range(3)) == 2, order


def test_a_replacement_fills_the_stage_its_region_left_and_a_peer_without_a_domain_ignores_domains():
    fleet = [dataclasses.replace(serving(stage, f"{region}{stage}", 5.0), domain=region)
             for stage, region in [(0, "A"), (0, "B"), (1, "A"), (2, "A"), (2, "B")]]
    assert stage_for_joining(fleet, 3, "n", 5.0, "B") == 1  # stage 1 lost its peer in B
    three = [*fleet, dataclasses.replace(serving(1, "A1b", 5.0), domain="A")]  # stage 1: two peers, both in A
    assert stage_for_joining(three, 3, "n", 5.0, "B") == 1  # B's peer goes where B is missing
    assert stage_for_joining(three, 3, "n", 5.0, "A") == 0  # an A peer to the first of the slowest stages
    slow = [dataclasses.replace(r, samples_per_second=1.0) if r.stage == 2 else r for r in three]
    assert stage_for_joining(slow, 3, "n", 5.0, "B") == 1  # B missing from stage 1 outranks the limiting stage 2
    assert stage_for_joining(slow, 3, "n", 5.0, "") == 2  # no domain: the limiting stage, as before


def test_the_controller_names_each_stage_peer_its_region(tmp_path: Path):
    spec = ClusterSpec.model_validate({
        "name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": 7},
        "training": {"mode": "swarm", "task": "spotrain.examples.tiny_gpt_pipeline:task"},
        "providers": {"local": {"regions": {"us-east": {}, "eu-west": {}}, "locations": {
            "us-east-a": {"price_usd_per_hour": 0.2, "region": "us-east"},
            "eu-west-a": {"price_usd_per_hour": 0.2, "region": "eu-west"}, "zone-c": {"price_usd_per_hour": 0.2}}}},
    })
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=0.0)
    provider = LocalProvider(spec.providers.local, tmp_path / "cloud")
    loop = ControlLoop(spec, ledger, run, provider, StagedSwarm(), LoopSettings(), say=lambda _: None)
    domains = [loop.agent_config(location).pipeline.domain
               for location in ("local:us-east-a", "local:eu-west-a", "local:zone-c")]
    assert domains == ["local:us-east", "local:eu-west", "local:zone-c"]


def test_the_spec_can_turn_moves_off_and_the_stage_peers_are_told(tmp_path: Path):
    settings = []
    for pipeline in ({}, {"rebalance": False, "rebalance_seconds": 12}):
        spec = ClusterSpec.model_validate({
            "name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": 7},
            "training": {"mode": "swarm", "task": "spotrain.examples.tiny_gpt_pipeline:task", "pipeline": pipeline}})
        ledger = Ledger.create(tmp_path / f"ledger{len(settings)}.db")
        run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=0.0)
        provider = LocalProvider(spec.providers.local, tmp_path / "cloud")
        loop = ControlLoop(spec, ledger, run, provider, StagedSwarm(), LoopSettings(), say=lambda _: None)
        settings.append(loop.agent_config().pipeline)
    assert [(s.rebalance, s.rebalance_seconds) for s in settings] == [(True, 30.0), (False, 12.0)]


def test_stage_summary_counts_serving_peers_of_unexpired_records():
    records = [serving(0, "a", 2.0), serving(0, "b", 3.0), starting(1, "c", 0.0),
               StageRecord(1, "d", "i", 4.0, 0, AgentState.TRAINING, -100.0)]  # expired at now=0
    assert stage_summary(records, now=0.0) == [{"stage": 0, "peers": 2, "samples_per_second": 5.0}]


class StagedSwarm:
    """A live swarm's view: status records announcing each agent's peer id, and stage records."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentStatus] = {}
        self.records: list[StageRecord] = []

    def statuses(self) -> dict[str, AgentStatus]:
        return self.agents

    def addresses(self) -> list[str]:
        return []

    def assign_duty(self, ids: object) -> None:
        pass

    def stage_records(self) -> list[StageRecord]:
        return self.records

    def serve(self, stages: dict[str, int], now: float) -> None:
        """Each instance trains and serves the stage named (a forged record is added too)."""
        self.agents = {i: AgentStatus(i, AgentState.TRAINING, 0, 0, 0.0, None, 0, 0, None,
                                      (f"/ip4/127.0.0.1/tcp/1/p2p/peer-{i}",), now, role="stage") for i in stages}
        self.records = [StageRecord(stage, f"peer-{i}", i, 10.0 + stage, 0, AgentState.TRAINING, now)
                        for i, stage in stages.items()]
        self.records.append(StageRecord(0, "peer-intruder", next(iter(stages)), 99.0, 0, AgentState.TRAINING, now))


def test_the_controller_names_the_trainers_keeps_two_peers_per_stage_and_reports_the_stages(tmp_path: Path):
    spec = ClusterSpec.model_validate({
        "name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": 7},
        "training": {"mode": "swarm", "task": "spotrain.examples.tiny_gpt_pipeline:task"},
        # the workload never drains: a 1 s notice ends a retired VM, and all at finish(), at once
        "providers": {"local": {"time_compression": 0.001, "notice_seconds": 1.0}},
    })
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=0.0)
    swarm = StagedSwarm()
    provider = LocalProvider(spec.providers.local, tmp_path / "cloud",
                             workload=[sys.executable, "-c", "import time; time.sleep(600)"])
    loop = ControlLoop(spec, ledger, run, provider, swarm, LoopSettings(), say=lambda _: None)
    try:
        loop.tick()
        assert sorted(loop.roles.values()) == ["stage"] * 6 + ["trainer"]
        assert loop.agent_config().pipeline.role == "stage"  # the trainer lives
        peers = sorted(i for i, role in loop.roles.items() if role == "stage")
        # 3/2/1: stage 2 has one peer and no VM is on its way: one VM more, for that reason
        swarm.serve(dict(zip(peers, [0, 0, 0, 1, 1, 2])), time.time())
        loop.tick()
        extra = [row for row in ledger.instances(run_id=run.id) if row.reason == LaunchReason.STAGE_PEERS]
        assert len(extra) == 1 and len(loop.roles) == 8 and loop.roles[extra[0].instance_id] == "stage"
        (event,) = ledger.events(run.id, kinds=("stage peers",))
        assert json.loads(event["detail"]) == {"action": "launch", "instance_id": None,
                                               "peers_per_stage": {"0": 3, "1": 2, "2": 1}}
        loop.tick()  # the extra has not joined yet: it is the missing peer, nothing more is launched
        assert len(loop.roles) == 8
        assert build_report(ledger, run, "c")["stage_peer_launches"] == 1
        reported = build_report(ledger, run, "c")["stages"]
        assert [{k: v for k, v in stage.items() if k != "domains"} for stage in reported] == [
            # the intruder's record counted for nothing
            {"stage": 0, "peers": 3, "samples_per_second": 30.0}, {"stage": 1, "peers": 2, "samples_per_second": 22.0},
            {"stage": 2, "peers": 1, "samples_per_second": 12.0}]
        # each stage's domains are its peers' zones (local zones without a region), from the ledger
        zone = {row.instance_id: row.location for row in ledger.instances(run_id=run.id)}
        assert [stage["domains"] for stage in reported] == [
            sorted({zone[i] for i, s in zip(peers, [0, 0, 0, 1, 1, 2]) if s == stage}) for stage in range(3)]
        # the extra joins stage 2: 3/2/2 on 8 VMs where 7 are wanted, so stage 0's newest peer retires
        swarm.serve(dict(zip(peers + [extra[0].instance_id], [0, 0, 0, 1, 1, 2, 2])), time.time())
        loop.tick()
        retired = json.loads(ledger.events(run.id, kinds=("stage peers",))[-1]["detail"])
        assert retired["action"] == "retire" and retired["instance_id"] == peers[2]
        wait_for(lambda: all(i.state != "running" for i in provider.list_instances("c") if i.instance_id == peers[2]),
                 30, "the retired VM to end")
        trainer = next(i for i, role in loop.roles.items() if role == "trainer")
        swarm.agents = {trainer: AgentStatus(trainer, AgentState.DRAINING, 0, 0, 0.0, None, 0, 0, None, (), 0.0,
                                             role="trainer")}
        swarm.records = []
        loop.tick()  # the controller replaces a draining agent at once; a draining trainer does not count
        assert sorted(loop.roles.values()).count("trainer") == 2
    finally:
        loop.finish("test over")
        ledger.close()


def test_a_stage_peer_alone_in_the_swarm_waits_for_another_before_choosing():
    import hivemind

    from spotrain.agents.roles.stage_server import records_for_joining
    from spotrain.agents.stage_directory import publish_stage_record, wait_for_another_peer

    loopback = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    alone = hivemind.DHT(**loopback)
    other = None
    try:
        assert wait_for_another_peer(alone, timeout=2.0, poll=0.5) is None  # started alone: nobody to see
        other = hivemind.DHT(initial_peers=[str(a) for a in alone.get_visible_maddrs()], **loopback)
        waited = wait_for_another_peer(alone, timeout=60.0, poll=0.2)
        assert waited is not None and wait_for_another_peer(other, timeout=60.0, poll=0.2) is not None
        # a newcomer decides on serving peers' fresh records and on joining peers' for their whole TTL
        now = time.time()
        for record in (StageRecord(0, "killed", "i-killed", 5.0, 0, AgentState.TRAINING, now - 15.0),
                       StageRecord(0, "serving", "i-serving", 5.0, 0, AgentState.TRAINING, now - 1.0),
                       StageRecord(1, "joining", "i-joining", 0.0, 0, AgentState.STARTING, now - 15.0)):
            publish_stage_record(other, "c", record)
        seen = wait_for(lambda: (found := records_for_joining(alone, "c")) and len(found) == 2 and found, 30,
                        "the records to spread")
        assert sorted(r.peer_id for r in seen) == ["joining", "serving"]
    finally:
        for dht in (alone, other):
            if dht is not None:
                dht.shutdown()
