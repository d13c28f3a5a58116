"""Where the controller starts from and what it publishes: live state, never only launch-time peers."""

import json
import sys
from pathlib import Path

import pytest

from spotrain.contracts.live_peers import peers_value
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.errors import SpecError
from spotrain.providers.base import Instance
from spotrain.spec_file import parse_spec
from spotrain.swarm_peers import bootstrap_peers, controller_reachable, live_peers

A = "/ip4/127.0.0.1/tcp/4001/p2p/QmA"
B = "/ip4/127.0.0.1/tcp/4002/p2p/QmB"


def instance(name: str, state: InstanceState, *addresses: str) -> Instance:
    return Instance(name, f"r-{name}", "c", "aws:us-east-1a", 0.1, state, 0.0, addresses=addresses)


def status(name: str, state: AgentState, *addresses: str) -> AgentStatus:
    return AgentStatus(name, state, 1, 8, 1.0, None, 0, 0, None, addresses, 0.0)


def test_bootstrap_takes_complete_addresses_of_running_instances_then_the_published_peers():
    running = [instance("i-a", InstanceState.RUNNING, A, "/ip4/10.0.0.5/tcp/31337"),
               instance("i-b", InstanceState.PREEMPTED, B)]
    assert bootstrap_peers(running, [B, A, "garbage"]) == [A, B]  # a cloud IP lacks the peer id
    assert bootstrap_peers(running, None) == [A]


def test_published_peers_are_the_controller_and_training_agents_that_still_run():
    statuses = [status("i-a", AgentState.TRAINING, A), status("i-b", AgentState.STARTING, B),
                status("i-gone", AgentState.TRAINING, "/ip4/127.0.0.1/tcp/1/p2p/QmG")]
    assert live_peers(["/ip4/127.0.0.1/tcp/9/p2p/QmC"], statuses, {"i-a", "i-b"}) == [
        "/ip4/127.0.0.1/tcp/9/p2p/QmC", A]
    assert peers_value([A, B], limit=len(A) + 3) == A  # whole multiaddrs only


def test_the_local_cloud_keeps_the_controller_reachable_and_a_setting_wins():
    assert controller_reachable("auto", on_this_host=True)
    assert not controller_reachable("no", on_this_host=True) and controller_reachable("yes", on_this_host=False)
    spec = parse_spec({"name": "c", "budget": {"total_usd": 1}, "controller": {"reachable": "no"}}, Path("c.yaml"),
                      import_task=False)
    assert spec.controller.reachable == "no"
    with pytest.raises(SpecError, match="c.yaml: controller.reachable"):
        parse_spec({"name": "c", "budget": {"total_usd": 1}, "controller": {"reachable": "maybe"}}, Path("c.yaml"),
                   import_task=False)


def test_the_local_provider_publishes_peers_that_the_vm_metadata_service_serves(tmp_path):

    from conftest import agent_config

    from spotrain.agents.metadata_watch import ImdsV2Client
    from spotrain.config import LocalProvider as LocalConfig
    from spotrain.providers.base import LaunchRequest
    from spotrain.providers.local import LocalProvider
    # the workload never drains: a 1 s notice ends its VM in the teardown at once, not after 10 s
    provider = LocalProvider(LocalConfig(time_compression=0.001, notice_seconds=1.0), tmp_path,
                             workload=[sys.executable, "-c", "import time; time.sleep(60)"])
    offer = provider.offers()[0]
    launched = provider.launch(LaunchRequest("c-r0", "c", offer, agent_config("c")))
    try:
        vm = tmp_path / "vms" / launched.instance_id
        client = ImdsV2Client(json.loads((vm / "state.json").read_text())["imds_url"])
        assert client.live_peers() is None  # nothing published yet: the agent waits
        provider.publish_peers("c", [A, B])
        assert client.live_peers() == [A, B]
        user_data = json.loads((vm / "user-data.json").read_text())
        assert user_data["host"] == "0.0.0.0" and user_data["announce_host"] == "127.0.0.1"
    finally:
        provider.terminate(launched.instance_id)
