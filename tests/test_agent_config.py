"""The agent's user-data contract: one frozen, versioned model, parsed once, refused in one line."""

import json
import subprocess
import sys

import pytest
from conftest import agent_config
from pydantic import ValidationError

from spotrain.contracts.agent_config import CONFIG_VERSION, AgentConfig, AgentConfigError, MetadataEndpoint


def test_the_wire_round_trips_and_leaves_absent_fields_out():
    config = agent_config(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"])
    wire = json.loads(config.to_json())
    assert wire["version"] == CONFIG_VERSION and wire["initial_peers"] == ["/ip4/127.0.0.1/tcp/1/p2p/Qm"]
    assert "instance_id" not in wire and "metadata" not in wire and "group_size" not in wire["training"]
    assert AgentConfig.from_json(config.to_json()) == config
    legacy = {k: v for k, v in wire.items() if k != "version"}  # written before the version field
    assert AgentConfig.from_json(json.dumps(legacy)).version == CONFIG_VERSION


def test_a_provider_completes_only_its_own_fields():
    config = agent_config()
    endpoint = MetadataEndpoint(kind="gce", url="http://metadata.google.internal")
    on_vm = config.for_vm(location="gcp:us-central1-a", instance_id="sp-1", metadata=endpoint, host="0.0.0.0",
                          port=31337)
    assert (on_vm.location, on_vm.instance_id, on_vm.metadata, on_vm.host, on_vm.port) == (
        "gcp:us-central1-a", "sp-1", endpoint, "0.0.0.0", 31337)
    assert on_vm.model_copy(update={"location": None, "instance_id": None, "metadata": None, "host": "127.0.0.1",
                                    "port": 0}) == config
    local = config.for_vm(location="local:zone-a")
    assert (local.instance_id, local.host, local.port) == (None, "127.0.0.1", 0)
    with pytest.raises(ValidationError):
        config.cluster = "other"  # frozen


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "version": CONFIG_VERSION + 1, "stages": [1]},
     (f"user-data version {CONFIG_VERSION + 1} is newer than this agent understands ({CONFIG_VERSION}): "
      "upgrade spotrain on the VM")),
    (lambda d: {**d, "training": {**d["training"], "learning_rate": 1}}, "training.learning_rate: unknown key"),
    (lambda d: {**d, "training": {**d["training"], "batch_size": "eight"}},
     "training.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'eight')"),
    (lambda d: {k: v for k, v in d.items() if k != "task"}, "task: Field required"),
    # a version that is not a JSON integer is refused, not rounded into one this agent knows
    (lambda d: {**d, "version": float(CONFIG_VERSION + 1)},
     f"version: must be a whole number, got {float(CONFIG_VERSION + 1)}"),
    (lambda d: {**d, "version": str(CONFIG_VERSION)}, f'version: must be a whole number, got "{CONFIG_VERSION}"'),
    (lambda d: {**d, "version": True}, "version: must be a whole number, got true"),
    (lambda d: {**d, "version": 0}, "version: Input should be greater than or equal to 1 (got 0)"),
])
def test_unusable_user_data_is_refused_in_one_line_naming_the_key(change, message):
    text = json.dumps(change(agent_config().wire()))
    with pytest.raises(AgentConfigError) as caught:
        AgentConfig.from_json(text, source="/etc/spotrain/user-data.json")
    assert str(caught.value) == f"/etc/spotrain/user-data.json: {message}"
    with pytest.raises(AgentConfigError, match=r"^user-data: not JSON: "):
        AgentConfig.from_json(text[:-1])


@pytest.mark.parametrize("text, message", [
    (json.dumps({**agent_config().wire(), "version": CONFIG_VERSION + 1}), "is newer than this agent understands"),
    ("{not json", "not JSON"),
    (json.dumps({**agent_config().wire(), "torch_threads": "many"}), "torch_threads: Input should be a valid integer"),
])
def test_the_agent_exits_with_one_line_and_no_traceback(tmp_path, text, message):
    path = tmp_path / "user-data.json"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "spotrain", "agent", "--user-data", str(path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert result.returncode == 78
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"agent: {path}: ") and message in result.stderr
    assert not (tmp_path / "swarm-addresses.json").exists()  # refused before joining anything
