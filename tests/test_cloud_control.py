"""The composite provider, the cloud spec sections, user-data rendering, and the control loop
moving on from a location without capacity (GCE fake, real client)."""

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml
from clouds import AWS_IMAGE, GCE_ZONES, PROJECT
from conftest import agent_config, shipped_code
from test_control_loop import WORKLOAD, QuietSwarm

from spotrain.config import ClusterSpec
from spotrain.contracts.live_peers import PEERS_TAG
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.ledger import Ledger
from spotrain.provider_factory import make_provider
from spotrain.providers.base import LaunchRequest
from spotrain.providers.bootstrap import render_cloud_init
from spotrain.providers.gcp import GcpProvider
from spotrain.providers.local import LocalProvider
from spotrain.providers.multi import MultiProvider


def spec(server, **placement) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "cc", "budget": {"total_usd": 5.0},
        "placement": {"workers": 2, "backups": 0, **placement},
        "providers": {"gcp": {"project": PROJECT, "zones": GCE_ZONES, "api_endpoint": server.url,
                              "machine_types": ["n1-standard-4"]}},
    })


def test_cloud_sections_add_known_locations_and_disable_the_default_local(gce):
    s = spec(gce, locations=["gcp:us-central1"])
    assert s.providers.enabled() == ["gcp"]
    assert s.provider_locations() == ["gcp:us-central1", "gcp:us-central1-a", "gcp:us-central1-b"]
    assert s.allows("gcp:us-central1-b") and not s.allows("gcp:europe-west4-a") and not s.allows("local:zone-a")
    assert ClusterSpec.model_validate(s.model_dump(mode="json")).providers.enabled() == ["gcp"]
    both = ClusterSpec.model_validate({"name": "x", "budget": {"total_usd": 1}, "providers": {
        "local": {}, "aws": {"regions": ["us-east-1"], "zones": ["us-east-1a"]}}})
    assert both.providers.enabled() == ["local", "aws"]
    assert both.provider_locations() == ["local:zone-a", "local:zone-b", "aws:us-east-1", "aws:us-east-1a"]
    assert isinstance(make_provider(s), MultiProvider)


@pytest.mark.parametrize("providers, message", [
    ({"gcp": {"project": PROJECT, "zones": ["us-central1"]}}, "providers.gcp.zones: bad zone name 'us-central1'"),
    ({"gcp": {"project": PROJECT, "zones": ["us-central1-a"], "machine_types": ["m9-huge"]}},
     "no spot price for machine type 'm9-huge'"),
    ({"aws": {"regions": ["us-east-1"], "zones": ["eu-west-1a"]}}, "zone 'eu-west-1a' is in none of the regions"),
    ({"aws": {"regions": []}}, "providers.aws.regions"),
    ({"aws": {"regions": ["us-east-1"], "bid": 3}}, "providers.aws.bid: unknown key"),
])
def test_bad_cloud_sections_are_one_line_errors(tmp_path, providers, message):
    from spotrain.errors import SpecError
    from spotrain.spec_file import load_spec

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "budget": {"total_usd": 1}, "providers": providers}))
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_user_data_refuses_credentials_and_carries_the_agent_config():
    from spotrain.contracts.agent_config import AgentConfig, TrainingSettings

    class LeakyTraining(TrainingSettings):  # a field added carelessly to the contract
        aws_secret_access_key: str = "x"

    class LeakyConfig(AgentConfig):
        training: LeakyTraining

    with pytest.raises(ValueError, match="training.aws_secret_access_key"):
        render_cloud_init(LeakyConfig.model_validate(agent_config().wire()), "aws")
    config = agent_config()
    rendered = yaml.safe_load(render_cloud_init(agent_config(code=shipped_code()), "gcp", worker_image="registry/w:1"))
    files = {f["path"]: base64.b64decode(f["content"]).decode() for f in rendered["write_files"]}
    assert json.loads(files["/etc/spotrain/user-data.json"]) == config.wire()
    assert AgentConfig.from_json(files["/etc/spotrain/user-data.json"]) == config
    unit = files["/etc/systemd/system/spotrain-agent.service"]
    assert "docker run" in unit and "SPOTRAIN_METADATA_KIND=gce" in unit and "Restart=on-failure" in unit
    assert rendered["runcmd"][-1][-1].endswith("systemctl enable --now spotrain-agent.service")
    assert "code" not in json.loads(files["/etc/spotrain/user-data.json"])  # the image carries the build


class StaticShipment:
    """What `spotrain launch` ships (spotrain/shipping.py), stood in for where a loop is driven directly."""

    def code_for(self, location):
        from spotrain.contracts.agent_config import ShippedCode

        return ShippedCode.model_validate(shipped_code())


def test_user_data_without_a_shipped_build_or_an_image_is_refused():
    with pytest.raises(ValueError, match="no shipped build"):
        render_cloud_init(agent_config(), "aws")


def test_the_composite_routes_by_location_and_takes_the_slowest_lag(gce, tmp_path):
    s = ClusterSpec.model_validate({"name": "cc", "budget": {"total_usd": 1}, "providers": {
        "local": {"time_compression": 0.001, "notice_seconds": 1},
        "gcp": {"project": PROJECT, "zones": GCE_ZONES, "api_endpoint": gce.url, "machine_types": ["n1-standard-4"]}}})
    local = LocalProvider(s.providers.local, tmp_path / "cloud", workload=WORKLOAD)
    multi = MultiProvider([local, GcpProvider(s.providers.gcp)])
    assert multi.termination_lag_seconds == max(local.termination_lag_seconds, 90.0)
    offers = {o.location: o for o in multi.offers()}
    on_gcp = multi.launch(LaunchRequest("cc-r00000", "cc", offers["gcp:us-central1-b"],
                                          agent_config("cc", code=shipped_code())))
    on_local = multi.launch(LaunchRequest("cc-r00001", "cc", offers["local:zone-a"], agent_config("cc")))
    assert {i.instance_id: i.location for i in multi.list_instances("cc")} == {
        on_gcp.instance_id: "gcp:us-central1-b", on_local.instance_id: "local:zone-a"}
    assert len(gce.state.all_instances()) == 1
    for instance in (on_gcp, on_local):
        multi.terminate(instance.instance_id)
    assert gce.state.all_instances()[0]["status"] == "STOPPING"  # the delete went to GCE
    local.terminate(on_local.instance_id)


@contextmanager
def cloud_loop(s: ClusterSpec, tmp_path) -> Iterator[tuple[ControlLoop, Ledger, list[str]]]:
    """A control loop over `s`'s real providers (the fakes'), what it says, and its ledger; the run ended after."""
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, s.model_dump(mode="json"), now=0.0)
    lines: list[str] = []
    loop = ControlLoop(s, ledger, run, make_provider(s), QuietSwarm(), LoopSettings(), say=lines.append)
    loop.shipment = StaticShipment()
    try:
        yield loop, ledger, lines
    finally:
        loop.finish("test over")
        ledger.close()


def test_a_capacity_error_moves_the_controller_to_the_next_offer_with_one_line(gce, tmp_path):
    s = spec(gce)
    gce.state.inject("us-central1-a", "ZONE_RESOURCE_POOL_EXHAUSTED", times=5)
    with cloud_loop(s, tmp_path) as (loop, ledger, lines):
        for _ in range(3):
            loop.tick()
        live = [i for i in loop.provider.list_instances("cc") if i.state == "running"]
        assert sorted(i.location for i in live) == ["gcp:us-central1-b", "gcp:us-central1-b"]
        failures = [line for line in lines if "failed" in line]
        assert len(failures) == 1 and "gcp:us-central1-a" in failures[0] and "CapacityError" in failures[0]
        failed = [r for r in ledger.instances() if r.state == "failed"]
        assert [r.location for r in failed] == ["gcp:us-central1-a"]
        assert {r.provider for r in ledger.instances()} == {"gcp"}
    assert gce.state.live_instances() == []


def test_an_aws_capacity_error_in_one_region_moves_the_controller_to_another(ec2_faults, tmp_path):
    s = ClusterSpec.model_validate({
        "name": "ca", "budget": {"total_usd": 5.0}, "placement": {"workers": 2, "backups": 0},
        "providers": {"aws": {"regions": ["us-east-1", "us-west-2"], "zones": ["us-east-1a", "us-west-2a"],
                              "image_id": AWS_IMAGE}},
    })
    ec2_faults.faults["us-east-1a"] = ("InsufficientInstanceCapacity", 500)
    with cloud_loop(s, tmp_path) as (loop, ledger, lines):
        for _ in range(3):
            loop.tick()
        live = [i for i in loop.provider.list_instances("ca") if i.state == "running"]
        assert sorted(i.location for i in live) == ["aws:us-west-2a", "aws:us-west-2a"]
        failures = [line for line in lines if "failed" in line]
        assert len(failures) == 1 and "aws:us-east-1a" in failures[0] and "InsufficientInstanceCapacity" in failures[0]
    assert {i.state for i in loop.provider.list_instances("ca")} == {"terminated"}


AGENT_TRACEBACK = ["Traceback (most recent call last):", '  File "/opt/spotrain/code/mytask.py", line 3, in <module>',
                   "    raise RuntimeError('no GPU here')", "RuntimeError: no GPU here"]


def failure_console(name: str) -> str:
    """What infra/spotrain-agent-failed.sh leaves on a VM's console after boot and cloud-init."""
    return (f"[    0.000] Linux version 6.8.0-1015-gcp\ncloud-init[812]: {name} up\n"
            "spotrain: agent failed (exit 1); powering off\n"
            + "".join(f"spotrain: agent failed: {line}\n" for line in ["agent: starting", *AGENT_TRACEBACK])
            + "[  301.200] reboot: Power down\n")


def test_a_gce_vm_that_powered_itself_off_stops_the_run_with_its_agents_lines_and_is_deleted(gce, tmp_path):
    s = spec(gce)
    with cloud_loop(s, tmp_path) as (loop, ledger, lines):
        loop.tick()
        failed, other = loop.provider.list_instances("cc")
        zone = failed.location.split(":", 1)[1]
        gce.state.print_to_console(zone, failed.instance_id, failure_console(failed.instance_id))
        gce.state.power_off(zone, failed.instance_id)
        loop.tick()
        assert loop.failed
        assert loop.end_reason == f"agent failed (exit 1) on {failed.instance_id}: RuntimeError: no GPU here"
        said = lines[lines.index(next(line for line in lines if "kept failing" in line)):]
        assert said[1:1 + len(AGENT_TRACEBACK)] == [f"  {line}" for line in AGENT_TRACEBACK]  # the header first
        assert not any("Linux version" in line or "Power down" in line for line in said)  # the agent's lines only
        assert len(ledger.instances()) == 2  # nothing launched in its place
        (row,) = [r for r in ledger.instances() if r.instance_id == failed.instance_id]
        assert row.end_reason == "agent failed"
        deletes = [path.rsplit("/", 1)[1] for method, path, _ in gce.requests if method == "DELETE"]
        assert failed.instance_id in deletes  # stopped, it is no worker to end, but its disk would stay billed
        assert other.instance_id in deletes  # the run ended


def test_an_ec2_instance_that_shut_itself_down_stops_the_run_with_its_agents_lines(aws, tmp_path, monkeypatch):
    import moto.ec2.responses.general as moto_console
    from clouds import power_off_aws

    s = ClusterSpec.model_validate({
        "name": "ca", "budget": {"total_usd": 5.0}, "placement": {"workers": 1, "backups": 0},
        "providers": {"aws": {"regions": ["us-east-1"], "zones": ["us-east-1a"], "image_id": AWS_IMAGE}}})
    with cloud_loop(s, tmp_path) as (loop, ledger, lines):
        loop.tick()
        (failed,) = loop.provider.list_instances("ca")
        # moto's console is one sample text for every instance: this one's, as the VM left it
        monkeypatch.setattr(moto_console, "SAMPLE_CONSOLE_OUTPUT", failure_console(failed.instance_id))
        power_off_aws(failed.instance_id)
        loop.tick()
        assert loop.failed
        assert loop.end_reason == f"agent failed (exit 1) on {failed.instance_id}: RuntimeError: no GPU here"
        assert f"  {AGENT_TRACEBACK[0]}" in lines and len(ledger.instances()) == 1


def test_the_failure_script_prints_the_marker_only_for_a_unit_that_failed_for_good(tmp_path):
    """infra/spotrain-agent-failed.sh with systemctl and journalctl played by scripts on PATH:
    its lines are what spotrain.logs reads, and a unit still restarting leaves the VM running."""
    import os
    import shlex
    import subprocess

    from conftest import ROOT

    from spotrain.logs import agent_lines, failed_exit, last_error_lines

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        '#!/bin/sh\necho "$@" >> "$CALLS"\ncase "$1 $3" in\n  "is-failed "*) exit "$NOT_FAILED" ;;\n'
        '  "show ExecMainStatus") echo 1 ;;\n  "show ExecMainCode") echo 1 ;;\nesac\n')
    (bin_dir / "journalctl").write_text("#!/bin/sh\necho \"$@\" >> \"$CALLS\"\nprintf '%s\\n' "
                                        + " ".join(map(shlex.quote, AGENT_TRACEBACK)) + "\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = ROOT / "infra" / "spotrain-agent-failed.sh"
    for not_failed in (0, 1):
        calls = tmp_path / f"calls-{not_failed}"
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), NOT_FAILED=str(not_failed))
        result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30, check=True)
        if not_failed:
            assert result.stdout == "" and "poweroff" not in calls.read_text()
            continue
        assert last_error_lines(agent_lines(result.stdout)) == AGENT_TRACEBACK
        assert failed_exit(result.stdout) == "exit 1"
        assert calls.read_text().splitlines()[-1] == "poweroff"
        assert "_SYSTEMD_UNIT=spotrain-agent.service" in calls.read_text()  # the agent's lines, not systemd's


def test_every_provider_satisfies_the_protocol(gce):
    from spotrain.providers.aws import AwsProvider
    from spotrain.providers.base import Provider

    s = spec(gce)
    aws = AwsProvider(ClusterSpec.model_validate({"name": "x", "budget": {"total_usd": 1}, "providers": {
        "aws": {"regions": ["us-east-1"]}}}).providers.aws)
    for provider in (aws, GcpProvider(s.providers.gcp), make_provider(s)):
        assert isinstance(provider, Provider)


def test_the_cloud_example_spec_loads():
    from conftest import ROOT

    from spotrain.spec_file import load_spec

    s = load_spec(ROOT / "examples" / "clouds.yaml")
    assert s.providers.enabled() == ["aws", "gcp"]
    assert s.allows("aws:us-east-1b") and s.allows("gcp:us-central1-a") and not s.allows("local:zone-a")


@pytest.mark.parametrize("worker_image", [None, "registry/spotrain-worker:1"])
def test_the_rendered_systemd_unit_passes_systemd_analyze(tmp_path, worker_image):
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    rendered = yaml.safe_load(render_cloud_init(agent_config(code=shipped_code()), "aws", worker_image=worker_image))
    files = {f["path"]: base64.b64decode(f["content"]).decode() for f in rendered["write_files"]}
    unit, failed = (files[f"/etc/systemd/system/{name}"] for name in ("spotrain-agent.service",
                                                                     "spotrain-agent-failed.service"))
    assert "OnFailure=spotrain-agent-failed.service" in unit
    assert "ExecStart=/bin/sh /etc/spotrain/agent-failed.sh" in failed and "/etc/spotrain/agent-failed.sh" in files
    # the commands exist on the VM, not here: verify everything else with stand-ins (the folder of
    # the files given is on verify's search path, so OnFailure= finds the second unit)
    paths = [tmp_path / "spotrain-agent.service", tmp_path / "spotrain-agent-failed.service"]
    for path, text in zip(paths, (unit, failed), strict=True):
        path.write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", text, flags=re.MULTILINE))
    result = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert not any(path.name in result.stderr for path in paths), result.stderr  # unknown keys: only warnings


def aws_api_calls() -> set[str]:
    """The IAM actions of the EC2 and SSM calls providers/aws.py makes (read from its source)."""
    from conftest import ROOT

    source = (ROOT / "providers" / "aws.py").read_text()
    calls = set(re.findall(r"\.([a-z]+(?:_[a-z]+)+)\(", source)) | set(re.findall(r'get_paginator\("(\w+)"\)', source))
    # boto3's own helpers, the agent config's, and STS's identity call (it needs no permission)
    calls -= {"get_paginator", "get_credentials", "get_caller_identity", "for_vm"}
    assert {"run_instances", "create_tags", "describe_instances"} <= calls, calls
    return {("ssm:" if call == "get_parameter" else "ec2:") + call.title().replace("_", "") for call in calls}


def test_the_iam_policies_are_least_privilege():
    from conftest import ROOT

    for name in ("aws-controller-policy.json", "aws-worker-policy.json"):
        policy = json.loads((ROOT / "infra" / name).read_text())
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert statement["Effect"] == "Allow" and not any(a.endswith("*") for a in actions), statement
            if statement["Resource"] == "*":  # only reads, and tags written while creating
                assert all(a.split(":")[1].startswith("Describe") for a in actions) or "Condition" in statement
            if set(actions) & {"ec2:TerminateInstances", "ec2:AuthorizeSecurityGroupIngress", "iam:PassRole",
                               "ec2:GetConsoleOutput"}:
                assert "Condition" in statement, statement
    role = yaml.safe_load((ROOT / "infra" / "gcp-controller-role.yaml").read_text())
    assert all(p.startswith("compute.") for p in role["includedPermissions"])
    assert "compute.instances.delete" in role["includedPermissions"]
    # what the controller calls to read a failed agent's lines (and `spotrain logs`)
    controller = json.loads((ROOT / "infra" / "aws-controller-policy.json").read_text())
    allowed = {action for statement in controller["Statement"]
               for action in (statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]])}
    assert aws_api_calls() <= allowed, aws_api_calls() - allowed  # every call the provider makes is allowed
    # the live peers (publish_peers) are re-tagged on running workers: only that key, only spotrain's instances
    (retag,) = [s for s in controller["Statement"] if s["Action"] == "ec2:CreateTags" and "ec2:CreateAction"
                not in str(s["Condition"])]
    assert retag["Condition"]["ForAllValues:StringEquals"] == {"aws:TagKeys": [PEERS_TAG]}
    assert retag["Condition"]["StringLike"] == {"aws:ResourceTag/spotrain:cluster": "?*"}
    assert "compute.instances.getSerialPortOutput" in role["includedPermissions"]
