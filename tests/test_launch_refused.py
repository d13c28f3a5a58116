"""A launch the cloud refuses for a reason no retry can fix (an image or instance profile the account
does not have, a missing permission) ends the run at once, with one line naming the setting; real
boto3 against moto (through the EC2 fault proxy where moto does not check) and the GCE fake."""

import pytest
from clouds import AWS_IMAGE, GCE_ZONES, PROJECT
from test_cloud_control import StaticShipment
from test_control_loop import QuietSwarm

from spotrain.config import ClusterSpec
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
from spotrain.provider_factory import make_provider


def run_ticks(s: ClusterSpec, tmp_path, ticks: int = 3) -> tuple[list[str], Ledger, ControlLoop]:
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, s.model_dump(mode="json"), now=0.0)
    lines: list[str] = []
    loop = ControlLoop(s, ledger, run, make_provider(s), QuietSwarm(), LoopSettings(), say=lines.append)
    loop.shipment = StaticShipment()  # what `spotrain launch` ships, where the loop is driven directly
    for _ in range(ticks):
        loop.tick()
    return lines, ledger, loop


def assert_ended_with_one_line(lines: list[str], ledger: Ledger, loop: ControlLoop, setting: str, code: str) -> None:
    assert loop.ended.is_set() and loop.failed  # `spotrain launch` exits 1
    assert len(lines) == 1, lines  # no retry, no second line per tick
    assert lines[0].startswith("ending the run: launch refused in ") and setting in lines[0] and code in lines[0]
    (run,) = [r for r in [ledger.run(loop.run.id)] if r is not None]
    assert run.end_reason is not None and setting in run.end_reason
    rows = ledger.instances()
    assert len(rows) == 1 and rows[0].state == "failed"  # one request, refused; nothing else launched
    assert [i for i in loop.provider.list_instances(loop.spec.name) if i.state == "running"] == []


def aws_spec(**aws) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "lr", "budget": {"total_usd": 5.0}, "placement": {"workers": 2, "backups": 0},
        "providers": {"aws": {"regions": ["us-east-1"], "zones": ["us-east-1a"], "image_id": AWS_IMAGE, **aws}},
    })


@pytest.mark.parametrize("code,status,setting", [
    ("InvalidAMIID.NotFound", 400, "providers.aws.image_id"),
    ("InvalidKeyPair.NotFound", 400, "providers.aws.key_name"),
    ("UnauthorizedOperation", 403, "aws launch in us-east-1a"),  # a permission error: the credentials' own
])
def test_an_aws_launch_refused_for_good_ends_the_run_with_one_line(ec2_faults, tmp_path, code, status, setting):
    ec2_faults.faults["us-east-1a"] = (code, status)
    lines, ledger, loop = run_ticks(aws_spec(), tmp_path)
    try:
        assert_ended_with_one_line(lines, ledger, loop, setting, code)
        assert ec2_faults.hits == [code]  # asked once, never again
    finally:
        ledger.close()


def test_a_missing_instance_profile_ends_the_run_naming_the_setting(aws, tmp_path):
    lines, ledger, loop = run_ticks(aws_spec(iam_instance_profile="no-such-profile"), tmp_path)
    try:
        assert_ended_with_one_line(lines, ledger, loop, "providers.aws.iam_instance_profile", "no-such-profile")
    finally:
        ledger.close()


def gcp_spec(server, **gcp) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "lr", "budget": {"total_usd": 5.0}, "placement": {"workers": 2, "backups": 0},
        "providers": {"gcp": {"project": PROJECT, "zones": GCE_ZONES[:1], "api_endpoint": server.url,
                              "machine_types": ["n1-standard-4"], **gcp}},
    })


@pytest.mark.parametrize("key,value,setting", [
    ("image", "projects/my-proj/global/images/gone", "providers.gcp.image"),
    ("service_account", "worker@my-proj.iam.gserviceaccount.com", "providers.gcp.service_account"),
])
def test_a_gce_launch_refused_for_good_ends_the_run_with_one_line(gce, tmp_path, key, value, setting):
    gce.state.absent.add(value)
    lines, ledger, loop = run_ticks(gcp_spec(gce, **{key: value}), tmp_path)
    try:
        assert_ended_with_one_line(lines, ledger, loop, setting, value)
    finally:
        ledger.close()


def test_a_capacity_refusal_is_still_retried_elsewhere(ec2_faults, tmp_path):
    """The other side: a refusal that time can fix does not end the run."""
    ec2_faults.faults["us-east-1a"] = ("InsufficientInstanceCapacity", 500)
    lines, ledger, loop = run_ticks(aws_spec(), tmp_path, ticks=1)
    try:
        assert not loop.ended.is_set()
        assert any("InsufficientInstanceCapacity" in line and "trying other offers" in line for line in lines)
    finally:
        loop.finish("test over")
        ledger.close()
