"""Each provider's console_output (what `spotrain logs` shows of an agent): EC2's console output
against moto, GCE's serial port against the GCE fake, a local VM's agent.log; the multi-provider
routes by location."""

import sys
import time

import pytest
from clouds import AWS_IMAGE, AWS_REGION, GCE_ZONES, PROJECT
from conftest import agent_config, shipped_code, wait_for

from spotrain.config import AwsProvider as AwsConfig
from spotrain.config import GcpProvider as GcpConfig
from spotrain.config import LocalLocation
from spotrain.config import LocalProvider as LocalConfig
from spotrain.providers.aws import AwsProvider
from spotrain.providers.base import ConsoleProvider, LaunchRequest, ProviderError
from spotrain.providers.gcp import GcpProvider
from spotrain.providers.local import LocalProvider
from spotrain.providers.multi import MultiProvider

USER_DATA = agent_config("c", code=shipped_code())


def launch(provider, location: str, request_id: str):
    (offer,) = [o for o in provider.offers() if o.location == location]
    return provider.launch(LaunchRequest(request_id, "c", offer, USER_DATA))


def test_aws_console_output_is_the_instances_console(aws):
    p = AwsProvider(AwsConfig.model_validate({"regions": [AWS_REGION], "zones": ["us-east-1a"],
                                              "image_id": AWS_IMAGE}))
    assert isinstance(p, ConsoleProvider)
    instance = launch(p, "aws:us-east-1a", "c-r00000")
    text = p.console_output(instance.instance_id, instance.location)
    assert "Linux version" in text  # moto's sample console, base64-decoded by botocore
    assert p.console_output("i-0123456789abcdef0", "aws:us-east-1a") == ""  # unknown or long gone


def test_aws_console_output_without_credentials_is_a_typed_error(aws, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    p = AwsProvider(AwsConfig.model_validate({"regions": [AWS_REGION], "image_id": AWS_IMAGE}))
    with pytest.raises(ProviderError, match="aws: no usable credentials"):
        p.console_output("i-0123456789abcdef0", "aws:us-east-1a")


def test_gcp_console_output_is_serial_port_one_until_the_vm_is_deleted(gce):
    p = GcpProvider(GcpConfig.model_validate({"project": PROJECT, "zones": GCE_ZONES, "api_endpoint": gce.url}))
    instance = launch(p, "gcp:us-central1-a", "c-r00000")
    assert p.console_output(instance.instance_id, instance.location) == f"fake-gce: {instance.instance_id} booted\n"
    gce.state.print_to_console("us-central1-a", instance.instance_id, "agent: joined the swarm\n")
    assert p.console_output(instance.instance_id, instance.location).endswith("agent: joined the swarm\n")
    serial_reads = [q for method, path, q in gce.requests if path.endswith(f"/{instance.instance_id}/serialPort")]
    assert serial_reads and all(q["port"] == ["1"] for q in serial_reads)
    p.terminate(instance.instance_id)
    wait_for(lambda: instance.instance_id not in gce.state.instances["us-central1-a"], 10, "the delete")
    assert p.console_output(instance.instance_id, instance.location) == ""


def test_local_console_output_is_the_agent_log_and_multi_routes_by_location(tmp_path):
    workload = [sys.executable, "-c", "print('agent: hello from the vm', flush=True); import time; time.sleep(60)"]
    local = LocalProvider(LocalConfig(locations={"zone-a": LocalLocation(price_usd_per_hour=0.5)},
                                      time_compression=0.001, notice_seconds=1.0), tmp_path, workload=workload)
    multi = MultiProvider([local])
    instance = launch(multi, "local:zone-a", "c-r00001")
    try:
        text = wait_for(lambda: multi.console_output(instance.instance_id, instance.location), 30, "agent output")
        assert "agent: hello from the vm" in text
        assert local.console_output("i-unknown") == ""
        with pytest.raises(ProviderError, match="no provider 'aws'"):
            multi.console_output("i-0123456789abcdef0", "aws:us-east-1a")
    finally:
        multi.terminate(instance.instance_id)
        wait_for(lambda: local.list_instances("c")[0].state != "running", 30, "the VM to end")
        time.sleep(0.2)
