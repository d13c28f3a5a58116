"""The control loop against a real ledger and the real local provider (tiny workloads)."""

import sys

import pytest
from conftest import agent_config

from spotrain.config import ClusterSpec
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
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
    spec = ClusterSpec.model_validate({
        "name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": 2, "backups": 0},
        "providers": {"local": {"time_compression": 0.001}},
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
