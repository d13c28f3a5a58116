"""A mixed AWS + GCP cluster through the CLI: boto3 against moto's server, google-cloud-compute
against the GCE fake. Nothing boots these VMs, so no agent ever reports: the controller places,
replaces and terminates on what the clouds' APIs say."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import yaml
from clouds import AWS_IMAGE, PROJECT, aws_instances, preempt_aws
from conftest import ROOT, processes_under, run_cli, wait_for


def write_spec(tmp_path: Path, gce_url: str, name: str, aws_zones: list[str], gce_zones: list[str], wanted: int,
               gcp_price: float | None = None) -> Path:
    gcp = {"project": PROJECT, "zones": gce_zones, "api_endpoint": gce_url, "machine_types": ["n1-standard-4"]}
    if gcp_price is not None:
        gcp["spot_prices_usd_per_hour"] = {"n1-standard-4": gcp_price}
    spec = {
        "name": name, "budget": {"total_usd": 5.0},
        # spread-cheapest: this test is about both clouds, so workers go to both
        "placement": {"workers": wanted - 1, "backups": 1, "locations": ["aws:us-east-1", "gcp:us-central1"],
                      "policy": "spread-cheapest"},
        "providers": {"aws": {"regions": ["us-east-1"], "zones": aws_zones, "instance_types": ["g4dn.xlarge"],
                              "image_id": AWS_IMAGE}, "gcp": gcp},
    }
    # the VMs of both clouds fetch the shipped build from this bucket (presigned S3 URLs)
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=f"{name}-bucket")
    spec["checkpoint"] = {"stores": [f"s3://{name}-bucket/run"]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_controller(path: Path, home: Path, hang_markers: Path | None = None) -> subprocess.Popen:
    """`spotrain launch`; with `hang_markers`, one whose launches never return (tests/hang_after_launch.py)."""
    env = dict(os.environ, SPOTRAIN_HOME=str(home))
    log = open(home.parent / f"controller-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
    cli = ["-m", "spotrain"] if hang_markers is None else [str(Path(__file__).with_name("hang_after_launch.py")),
                                                           str(hang_markers)]
    return subprocess.Popen([sys.executable, *cli, "launch", str(path), "--tick", "1", "--duration", "900",
                             "--no-report"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def aws_live() -> list[dict]:
    return [i for i in aws_instances() if i["State"]["Name"] in ("pending", "running", "shutting-down")]


def request_ids(gce) -> list[str]:
    """Every launch request either cloud ever accepted (deleted GCE VMs included)."""
    ids = [t["Value"] for i in aws_instances() for t in i.get("Tags", []) if t["Key"] == "spotrain:request-id"]
    return ids + list(gce.request_ids_seen)


def track_gce_requests(gce) -> None:
    """Remember every VM the fake ever held (a preempted one is deleted), by its spotrain request id."""
    gce.request_ids_seen = []
    state = gce.state
    original = state.insert_instance

    def insert_instance(zone, body, request_id):
        before = set(state.instances[zone])
        op = original(zone, body, request_id)
        if body.get("name") in set(state.instances[zone]) - before:
            items = {m["key"]: m["value"] for m in body.get("metadata", {}).get("items", [])}
            gce.request_ids_seen.append(items["spotrain-request-id"])
        return op

    state.insert_instance = insert_instance


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(30)


def test_mixed_cluster_replaces_preempted_vms_in_both_clouds_and_down_leaves_nothing(aws, gce, home, tmp_path):
    track_gce_requests(gce)
    path = write_spec(tmp_path, gce.url, "mixed", ["us-east-1a", "us-east-1b"], ["us-central1-a", "us-central1-b"], 4)
    controller = start_controller(path, home)
    try:
        wait_for(lambda: len(aws_live()) == 2 and len(gce.state.live_instances()) == 2, 120, "two VMs in each cloud")
        aws_victim = aws_live()[0]["InstanceId"]
        gce_victim = gce.state.live_instances()[0]
        preempt_aws(aws_victim)
        gce.state.preempt(gce_victim["zone"].rsplit("/", 1)[-1], gce_victim["name"])
        wait_for(lambda: len(aws_instances()) == 3 and len(gce.request_ids_seen) == 3
                 and len(aws_live()) == 2 and len(gce.state.live_instances()) == 2, 120, "a replacement in each cloud")
        assert aws_victim not in {i["InstanceId"] for i in aws_live()}
        assert gce_victim["name"] not in {i["name"] for i in gce.state.live_instances()}

        result = run_cli("down", "mixed", home=home, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert controller.wait(60) == 0
    finally:
        stop(controller)
    assert aws_live() == [] and {i["State"]["Name"] for i in aws_instances()} == {"terminated"}
    assert gce.state.live_instances() == []
    report = json.loads(run_cli("report", "mixed", "--json", home=home, check=True).stdout)
    assert report["preemptions"] == 2 and report["replacements"] == 2
    assert {row["location"].split(":")[0] for row in report["spend_by_location"]} == {"aws", "gcp"}
    ids = request_ids(gce)
    assert len(ids) == len(set(ids)) == 6
    wait_for(lambda: processes_under(home) == [], 30, "no controller or DHT process left")


def test_a_controller_killed_mid_launch_never_launches_twice(aws, gce, home, tmp_path):
    track_gce_requests(gce)
    # GCP is the cheapest here, so the first launch goes there and the second to AWS
    path = write_spec(tmp_path, gce.url, "killed", ["us-east-1a"], ["us-central1-a"], 3, gcp_price=1e-6)
    markers = tmp_path / "launched"
    for cloud, count in (("gcp", 1), ("aws", 2)):
        controller = start_controller(path, home, hang_markers=markers)
        try:  # hangs once the cloud accepted the launch, before the ledger hears of it: kill it there
            wait_for(lambda n=count: len(list(markers.glob("*.launched"))) == n, 120, f"a launch accepted by {cloud}")
        finally:
            controller.send_signal(signal.SIGKILL)
            controller.wait(30)
        assert len(request_ids(gce)) == count  # the killed launch exists in the cloud, exactly once
    assert [i["Placement"]["AvailabilityZone"] for i in aws_live()] == ["us-east-1a"]
    assert len(gce.state.live_instances()) == 1

    controller = start_controller(path, home)
    try:
        wait_for(lambda: len(aws_live()) + len(gce.state.live_instances()) == 3, 120, "the third worker")
        time.sleep(3)  # a few more ticks: nothing else may appear
        ids = request_ids(gce)
        assert len(ids) == len(set(ids)) == 3  # the two interrupted requests were adopted, not re-launched
        status = json.loads(run_cli("status", "killed", "--json", home=home, check=True).stdout)
        assert sorted(w["state"] for w in status["workers"]) == ["running"] * 3
    finally:
        stop(controller)  # SIGKILL once more: `down` must clean up without a controller
    result = run_cli("down", "killed", home=home, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert aws_live() == [] and gce.state.live_instances() == []
    wait_for(lambda: processes_under(home) == [], 30, "no process left, the SIGKILLed controllers' included")


def test_missing_credentials_fail_before_any_launch_naming_the_provider(aws, gce, home, tmp_path, monkeypatch):
    path = write_spec(tmp_path, gce.url, "nocreds", ["us-east-1a"], ["us-central1-a"], 2)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for args in (["launch", str(path)], ["launch", str(path), "--detach"]):
        result = run_cli(*args, home=home, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith("spotrain: error: aws: no credentials found")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    result = run_cli("launch", str(path), home=home, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("spotrain: error: gcp: no credentials found")
    assert aws_instances() == [] and gce.state.all_instances() == []
    assert not (home / "clusters" / "nocreds" / "ledger.db").exists()
