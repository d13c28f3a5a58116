"""The control loop against a real ledger and the real local provider (tiny workloads)."""

import sys
from dataclasses import replace

import pytest
from conftest import agent_config

from spotrain.config import ClusterSpec
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
from spotrain.policies.spread import SpreadCheapest
from spotrain.providers.base import CapacityError, Instance, Offer
from spotrain.providers.local import LocalProvider

WORKLOAD = [sys.executable, "-c", "import time; time.sleep(600)"]


class QuietSwarm:
    """A swarm with no agents in it: the provider and the ledger are what is under test."""

    def statuses(self):
        return {}

    def addresses(self):
        return []

    def assign_duty(self, ids):
        pass


@pytest.fixture
def loop(tmp_path):
    # WORKLOAD never drains: a 1 s notice ends its VMs at finish() at once, not after 10 s
    spec = ClusterSpec.model_validate({
        "name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": 2, "backups": 0},
        "providers": {"local": {"time_compression": 0.001, "notice_seconds": 1.0}},
    })
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=0.0)
    provider = LocalProvider(spec.providers.local, tmp_path / "cloud", workload=WORKLOAD)
    loop = ControlLoop(spec, ledger, run, provider, QuietSwarm(), LoopSettings(), say=lambda _: None)
    yield loop
    loop.finish("test over")
    ledger.close()


def test_a_request_the_provider_never_saw_is_reissued_with_its_id(loop):
    # a controller that died after writing the request and before calling the provider
    loop.ledger.record_request(loop.run.id, "c-r00000", "local", "local:zone-b", 0.19, now=0.0)
    loop.tick()
    instances = loop.provider.list_instances("c")
    assert "c-r00000" in {i.request_id for i in instances}
    assert len(instances) == 2  # the reissued request plus one more worker
    loop.tick()
    assert len(loop.provider.list_instances("c")) == 2  # nothing launched twice


def test_a_running_instance_unknown_to_the_ledger_is_adopted(loop, tmp_path):
    from spotrain.providers.base import LaunchRequest

    (offer,) = [o for o in loop.offers if o.location == "local:zone-a"]
    loop.provider.launch(LaunchRequest("c-r00042", "c", offer, agent_config()))
    loop.tick()
    rows = {r.request_id: r for r in loop.ledger.instances()}
    assert rows["c-r00042"].state == "running" and rows["c-r00042"].reason == "adopted"
    assert len(loop.provider.list_instances("c")) == 2


class ScriptedCloud:
    """A provider in memory: zone-a refuses every launch, zone-b launches at once."""

    name, termination_lag_seconds = "local", 0.0

    def __init__(self):
        self.instances: dict[str, Instance] = {}

    def offers(self):
        return [Offer("local", "local:zone-a", "local.cpu", None, 0.1),
                Offer("local", "local:zone-b", "local.cpu", None, 0.2)]

    def launch(self, request):
        if request.offer.location == "local:zone-a":
            raise CapacityError("zone-a is full")
        instance = Instance(f"i-{request.request_id}", request.request_id, request.cluster, request.offer.location,
                            request.offer.spot_usd_per_hour, InstanceState.RUNNING, 0.0)
        self.instances[request.request_id] = instance
        return instance

    def list_instances(self, cluster):
        return list(self.instances.values())

    def terminate(self, instance_id):
        for request_id, i in self.instances.items():
            if i.instance_id == instance_id and i.state == InstanceState.RUNNING:
                self.instances[request_id] = replace(i, state=InstanceState.TERMINATED, ended_at=1.0,
                                                     end_reason=EndReason.TERMINATED_BY_REQUEST)


class RetiresWorkersInZoneB(SpreadCheapest):
    def retire(self, ctx):
        return [m.request_id for m in ctx.fleet if m.location == "local:zone-b"]


def test_refusals_and_retirements_are_typed_and_told(tmp_path):
    spec = ClusterSpec.model_validate({"name": "c", "budget": {"total_usd": 5.0},
                                       "placement": {"workers": 1, "backups": 0}})
    ledger = Ledger.create(tmp_path / "ledger.db")
    said: list[str] = []
    run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=0.0)
    loop = ControlLoop(spec, ledger, run, ScriptedCloud(), QuietSwarm(), LoopSettings(), say=said.append,
                       clock=lambda: 0.0, policy=RetiresWorkersInZoneB())
    loop.tick()  # zone-a refuses c-r00000; c-r00001 runs in zone-b
    loop.tick()  # the policy retires it
    rows = {r.request_id: r for r in ledger.instances()}
    refused = rows["c-r00000"]
    assert (refused.state, refused.end_reason) == (InstanceState.FAILED, EndReason.LAUNCH_FAILED)
    assert refused.end_detail == "CapacityError: zone-a is full"
    assert "retiring i-c-r00001: retired by the placement policy" in said
    loop.tick()
    retired = {r.request_id: r for r in ledger.instances()}["c-r00001"]
    assert (retired.state, retired.end_reason) == (InstanceState.TERMINATED, EndReason.TERMINATED_BY_REQUEST)
    ledger.close()


class AccusingSwarm(QuietSwarm):
    """Two agents: the first one's poison guard counted the second's parts as offences."""

    def __init__(self, loop: ControlLoop):
        self.loop = loop

    def statuses(self):
        import time

        from spotrain.contracts.records import AgentStatus
        from spotrain.contracts.states import AgentState

        running = sorted(i.instance_id for i in self.loop.provider.list_instances("c")
                         if i.state == InstanceState.RUNNING)[:2]
        if len(running) < 2:
            return {}
        honest, evil = running

        def status(instance_id: str, peer: str, offenders: dict) -> AgentStatus:
            return AgentStatus(instance_id, AgentState.TRAINING, 1, 10, 1.0, 2.0, 0, 0, None,
                               (f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",), time.time(), offenders=offenders)

        return {honest: status(honest, "QmHonest", {"QmEvil": 3}), evil: status(evil, "QmEvil", {})}


def test_an_instance_most_peers_caught_poisoning_is_revoked_and_terminated(loop, tmp_path):
    from spotrain.access import ClusterAccess

    loop.access = ClusterAccess(tmp_path / "access", "c")
    loop.tick()  # the fleet is launched
    loop.swarm = AccusingSwarm(loop)
    evil = sorted(i.instance_id for i in loop.provider.list_instances("c"))[1]
    loop.tick()
    assert loop.access.revoked() == {evil}  # the accused alone: its one witness is the honest agent
    ended = {i.instance_id: i.state for i in loop.provider.list_instances("c")}
    assert ended[evil] != InstanceState.RUNNING or wait_ended(loop, evil)


def wait_ended(loop: ControlLoop, instance_id: str) -> bool:
    from conftest import wait_for

    return wait_for(lambda: {i.instance_id: i.state for i in loop.provider.list_instances("c")}[instance_id]
                    != InstanceState.RUNNING, 30, f"{instance_id} terminated")


class AdmittingSwarm(QuietSwarm):
    """Keeps every admission record the controller publishes."""

    def __init__(self):
        self.published: list[dict] = []

    def publish_admission(self, record, expires):
        self.published.append(record)


def test_every_vm_of_a_tick_is_admitted_before_the_first_boots(loop, tmp_path):
    import json

    from spotrain.access import ClusterAccess
    from spotrain.contracts.agent_config import AgentConfig

    loop.access = ClusterAccess(tmp_path / "access", "c")
    loop.swarm = AdmittingSwarm()
    loop.tick()  # two workers launched in one tick
    first = loop.swarm.published[0]["body"]["peers"]
    assert len(first) == 2  # published before the first launch, already listing both VMs
    instances = loop.provider.list_instances("c")
    assert len(instances) == 2
    for instance in instances:  # each VM's own user-data record lists the other VM too
        vm_dir = tmp_path / "cloud" / "vms" / instance.instance_id
        config = AgentConfig.from_json((vm_dir / "user-data.json").read_text())
        assert len(config.admission.record["body"]["peers"]) == 2
    json.dumps(loop.swarm.published)  # the records are plain JSON
