"""The AWS provider with the real boto3 against moto's server (and a proxy that injects EC2 errors)."""

import base64
import json

import boto3
import pytest
import yaml
from clouds import AWS_IMAGE, AWS_REGION, aws_instances, power_off_aws, preempt_aws
from conftest import agent_config, shipped_code

from spotrain.config import AwsProvider as AwsConfig
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.aws import AwsProvider, client_token
from spotrain.providers.base import (
    SELF_SHUTDOWN_DETAIL,
    AuthError,
    CapacityError,
    LaunchRequest,
    PriceError,
    QuotaError,
)

USER_DATA = agent_config("c1", initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"], task="m:t", code=shipped_code())


def provider(**overrides) -> AwsProvider:
    config = {"regions": [AWS_REGION], "zones": ["us-east-1a", "us-east-1b"], "image_id": AWS_IMAGE,
              "controller_cidr": "203.0.113.7/32", **overrides}
    return AwsProvider(AwsConfig.model_validate(config))


def request(p: AwsProvider, request_id: str, zone: str = "us-east-1a") -> LaunchRequest:
    (offer,) = [o for o in p.offers() if o.location == f"aws:{zone}"]
    return LaunchRequest(request_id, "c1", offer, USER_DATA)


def test_offers_come_from_the_spot_price_history(aws):
    offers = provider(instance_types=["g4dn.xlarge", "g5.xlarge"]).offers()
    assert {(o.location, o.instance_type) for o in offers} == {
        (f"aws:{z}", t) for z in ("us-east-1a", "us-east-1b") for t in ("g4dn.xlarge", "g5.xlarge")}
    assert {o.gpu for o in offers} == {"T4", "A10G"}
    assert all(o.provider == "aws" and o.spot_usd_per_hour > 0 for o in offers)
    assert provider(max_price_usd_per_hour=1e-6).offers() == []  # moto's price is above this cap


def test_launch_is_a_tagged_one_time_spot_instance_with_cloud_init(aws):
    p = provider(max_price_usd_per_hour=0.5)
    instance = p.launch(request(p, "c1-r00000"))
    assert instance.state == "running" and instance.location == "aws:us-east-1a"
    assert instance.request_id == "c1-r00000" and instance.cluster == "c1"
    (described,) = aws_instances()
    assert described["InstanceLifecycle"] == "spot" and described["ClientToken"] == client_token("c1-r00000")
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["spotrain:cluster"] == "c1" and tags["spotrain:role"] == "worker"
    ec2 = boto3.client("ec2", region_name=AWS_REGION)
    raw = ec2.describe_instance_attribute(InstanceId=instance.instance_id, Attribute="userData")["UserData"]["Value"]
    cloud_init = yaml.safe_load(base64.b64decode(raw))
    files = {f["path"]: base64.b64decode(f["content"]).decode() for f in cloud_init["write_files"]}
    agent = json.loads(files["/etc/spotrain/user-data.json"])
    assert agent["cluster"] == "c1" and agent["metadata"] == {"kind": "aws-imdsv2", "url": "http://169.254.169.254"}
    assert "instance_id" not in agent  # the agent asks IMDS: only the VM knows its id at boot
    assert "Restart=on-failure" in files["/etc/systemd/system/spotrain-agent.service"]
    (group,) = ec2.describe_security_groups(GroupIds=[described["SecurityGroups"][0]["GroupId"]])["SecurityGroups"]
    assert group["GroupName"] == "spotrain-c1"
    for rule in group["IpPermissions"]:  # the swarm port only, from the group itself and the controller
        assert rule["FromPort"] == rule["ToPort"] == 31337
        assert [pair["GroupId"] for pair in rule["UserIdGroupPairs"]] == [group["GroupId"]]
        assert [r["CidrIp"] for r in rule["IpRanges"]] == ["203.0.113.7/32"]


def test_user_data_carries_the_shipped_build_and_code_not_a_package_name(aws, moto_url, tmp_path):
    import hashlib
    import urllib.request

    from spotrain.code_archive import archive_code
    from spotrain.shipping import ship
    from spotrain.stores import open_store

    boto3.client("s3", region_name=AWS_REGION).create_bucket(Bucket="ship-test")
    wheel = tmp_path / "spotrain-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"the bytes of a wheel")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_task.py").write_text("task = None\n")
    build = ship(wheel, archive_code(tmp_path / "code"), open_store("s3://ship-test/run"))
    p = provider()
    (offer,) = [o for o in p.offers() if o.location == "aws:us-east-1a"]
    instance = p.launch(LaunchRequest("c1-r00042", "c1", offer, agent_config("c1", task="my_task:task",
                                                                             code=build.code())))
    ec2 = boto3.client("ec2", region_name=AWS_REGION)
    raw = base64.b64decode(ec2.describe_instance_attribute(InstanceId=instance.instance_id,
                                                           Attribute="userData")["UserData"]["Value"]).decode()
    assert "spotrain==" not in raw and "pip install" not in raw  # no package-index name anywhere
    cloud_init = yaml.safe_load(raw)
    files = {f["path"]: base64.b64decode(f["content"]).decode() for f in cloud_init["write_files"]}
    code = json.loads(files["/etc/spotrain/user-data.json"])["code"]
    digest = hashlib.sha256(b"the bytes of a wheel").hexdigest()
    assert code["wheel"]["sha256"] == digest and code["wheel"]["size"] == len(b"the bytes of a wheel")
    assert code["wheel"]["url"].startswith(f"{moto_url}/ship-test/run/code/{digest}/spotrain-0.1.0-py3-none-any.whl?")
    assert "X-Amz-Signature=" in code["wheel"]["url"] and code["wheel"]["auth"] == "none"
    assert code["archive"]["url"].split("?")[0].endswith(f"/code/{code['archive']['sha256']}/code.tar.gz")
    with urllib.request.urlopen(code["wheel"]["url"]) as reply:  # presigned: no credentials needed
        assert reply.read() == b"the bytes of a wheel"
    assert "def install_shipped" in files["/etc/spotrain/install_shipped.py"]
    (step,) = cloud_init["runcmd"]
    assert step[-1].startswith(
        "python3 /etc/spotrain/install_shipped.py /etc/spotrain/user-data.json /opt/spotrain && ")
    assert "PYTHONPATH=/opt/spotrain/code /opt/spotrain/bin/spotrain agent" in \
        files["/etc/systemd/system/spotrain-agent.service"]


def test_a_reissued_request_returns_its_instance(aws):
    p = provider()
    first = p.launch(request(p, "c1-r00001"))
    again = provider().launch(request(p, "c1-r00001"))  # a restarted controller, a fresh client
    assert again.instance_id == first.instance_id
    assert len(aws_instances()) == 1
    other = p.launch(request(p, "c1-r00002", zone="us-east-1b"))
    assert {i.instance_id for i in p.list_instances("c1")} == {first.instance_id, other.instance_id}
    assert p.list_instances("someone-else") == []


def test_preempted_and_terminated_are_told_apart(aws):
    p = provider()
    lost = p.launch(request(p, "c1-r00003"))
    ended = p.launch(request(p, "c1-r00004"))
    preempt_aws(lost.instance_id)
    p.terminate(ended.instance_id)
    p.terminate(ended.instance_id)  # idempotent
    p.terminate("i-0123456789abcdef0")  # unknown here: nothing happens
    states = {i.instance_id: (i.state, i.end_reason) for i in provider().list_instances("c1")}
    assert states[lost.instance_id] == (InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION)
    assert states[ended.instance_id][0] == "terminated"


def test_a_vm_that_shut_itself_down_is_an_agent_failure(aws):
    p = provider()
    failed = p.launch(request(p, "c1-r00005"))
    ended = p.launch(request(p, "c1-r00006"))
    ec2 = boto3.client("ec2", region_name=AWS_REGION)
    behaviour = ec2.describe_instance_attribute(InstanceId=failed.instance_id,
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"  # powered off: billed no more
    power_off_aws(failed.instance_id)
    p.terminate(ended.instance_id)
    seen = {i.instance_id: i for i in provider().list_instances("c1")}
    assert (seen[failed.instance_id].state, seen[failed.instance_id].end_reason) == (
        InstanceState.TERMINATED, EndReason.AGENT_FAILED)
    assert seen[failed.instance_id].end_detail == SELF_SHUTDOWN_DETAIL
    assert seen[ended.instance_id].end_reason == EndReason.TERMINATED_BY_REQUEST


@pytest.mark.parametrize("code, status, error", [
    ("InsufficientInstanceCapacity", 500, CapacityError),
    ("MaxSpotInstanceCountExceeded", 400, QuotaError),
    ("SpotMaxPriceTooLow", 400, PriceError),
    ("UnauthorizedOperation", 403, AuthError),
])
def test_ec2_errors_become_typed_errors(ec2_faults, code, status, error):
    p = provider()
    ec2_faults.faults["us-east-1a"] = (code, status)
    with pytest.raises(error, match=code):
        p.launch(request(p, "c1-r00005"))
    assert code in ec2_faults.hits
    assert p.launch(request(p, "c1-r00006", zone="us-east-1b")).state == "running"  # other zones still work


def test_missing_credentials_fail_with_a_line_naming_aws(aws, monkeypatch):
    provider().check_credentials()  # moto accepts the test keys
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AuthError, match=r"^aws: no credentials found"):
        provider().check_credentials()


def test_instances_report_their_private_and_public_addresses_and_carry_the_live_peers(aws):
    p = provider()
    instance = p.launch(request(p, "c1-r00010"))
    (described,) = aws_instances()
    private, public = described["PrivateIpAddress"], described.get("PublicIpAddress")
    assert private and instance.addresses[0] == f"/ip4/{private}/tcp/31337"
    assert instance.addresses[1:] == ((f"/ip4/{public}/tcp/31337",) if public else ())
    assert described["MetadataOptions"]["InstanceMetadataTags"] == "enabled"  # the agent reads the tag via IMDS

    peer = "/ip4/198.51.100.{}/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    p.publish_peers("c1", [peer.format(n) for n in range(5)])
    (described,) = aws_instances()
    value = {t["Key"]: t["Value"] for t in described["Tags"]}["spotrain:peers"]
    assert len(value) <= 256 and value.split() == [peer.format(n) for n in range(len(value.split()))]
    assert len(value.split()) >= 2  # whole multiaddrs, as many as fit in a tag
    (listed,) = p.list_instances("c1")
    assert listed.addresses == instance.addresses
