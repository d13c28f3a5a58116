"""The GCP provider with the real google-cloud-compute client (REST) and google-auth against the GCE fake."""

import base64
import json
import time
import uuid

import pytest
import yaml
from clouds import GCE_ZONES, PROJECT
from conftest import SHIPPED_SHA, agent_config, shipped_code

from spotrain.config import GcpProvider as GcpConfig
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.base import SELF_SHUTDOWN_DETAIL, AuthError, CapacityError, LaunchRequest, QuotaError
from spotrain.providers.gcp import GcpProvider, instance_name, request_uuid

GCS_URL = "https://storage.googleapis.com/storage/v1/b/b/o/run%2Fcode%2Fx%2Fw.whl?alt=media"
USER_DATA = agent_config("c2", task="m:t", code=shipped_code(GCS_URL) | {"wheel": {
    **shipped_code()["wheel"], "url": GCS_URL, "auth": "gce-metadata"}})


def provider(server, **overrides) -> GcpProvider:
    config = {"project": PROJECT, "zones": GCE_ZONES, "api_endpoint": server.url,
              "controller_cidr": "203.0.113.7/32", **overrides}
    return GcpProvider(GcpConfig.model_validate(config))


def request(p: GcpProvider, request_id: str, zone: str = "us-central1-a") -> LaunchRequest:
    (offer,) = [o for o in p.offers() if o.location == f"gcp:{zone}"]
    return LaunchRequest(request_id, "c2", offer, USER_DATA)


def inserts(server) -> list[dict]:
    return [q for method, path, q in server.requests if method == "POST" and path.endswith("/instances")]


def test_offers_use_the_built_in_table_or_the_spec(gce):
    offers = provider(gce, machine_types=["g2-standard-4", "n1-standard-4"],
                      spot_prices_usd_per_hour={"n1-standard-4": 0.05}).offers()
    prices = {(o.location, o.instance_type): (o.spot_usd_per_hour, o.gpu) for o in offers}
    assert prices[("gcp:us-central1-b", "g2-standard-4")] == (0.28, "L4")
    assert prices[("gcp:us-central1-a", "n1-standard-4")] == (0.05, None)


def test_launch_makes_a_labelled_spot_vm_after_waiting_on_its_operation(gce):
    p = provider(gce)
    instance = p.launch(request(p, "c2-r00000"))
    assert instance.instance_id == instance_name("c2-r00000") and instance.state == "running"
    assert instance.request_id == "c2-r00000" and instance.location == "gcp:us-central1-a"
    stored = gce.state.instances["us-central1-a"][instance.instance_id]
    assert stored["status"] == "RUNNING"  # the insert operation was waited on
    assert stored["scheduling"]["provisioningModel"] == "SPOT"
    assert stored["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert stored["labels"] == {"spotrain-cluster": "c2", "spotrain-role": "worker", "spotrain-request": "c2-r00000"}
    metadata = {item["key"]: item["value"] for item in stored["metadata"]["items"]}
    assert metadata["startup-script"].startswith("#!/bin/sh")
    cloud_init = yaml.safe_load(metadata["user-data"])
    files = {f["path"]: base64.b64decode(f["content"]).decode() for f in cloud_init["write_files"]}
    agent = json.loads(files["/etc/spotrain/user-data.json"])
    assert agent["instance_id"] == instance.instance_id
    assert agent["metadata"] == {"kind": "gce", "url": "http://metadata.google.internal"}
    # the shipped build, fetched with the VM's service account, verified by its digest; no package name
    assert agent["code"]["wheel"] == {"url": GCS_URL, "auth": "gce-metadata", "sha256": SHIPPED_SHA, "size": 10,
                                      "name": "spotrain-0.1.0-py3-none-any.whl"}
    assert "spotrain==" not in metadata["user-data"] and "install_shipped.py" in cloud_init["runcmd"][0][-1]
    (firewall,) = gce.state.firewalls.values()
    assert {a["IPProtocol"] for a in firewall["allowed"]} == {"tcp", "udp"}
    assert all(a["ports"] == ["31337"] for a in firewall["allowed"])
    assert firewall["sourceTags"] == firewall["targetTags"] == stored["tags"]["items"]
    assert firewall["sourceRanges"] == ["203.0.113.7/32"]
    assert inserts(gce)[0]["requestId"] == [request_uuid("c2-r00000", "insert")]
    uuid.UUID(request_uuid("c2-r00000", "insert"))


def test_a_reissued_request_never_makes_a_second_vm(gce):
    p = provider(gce)
    first = p.launch(request(p, "c2-r00001"))
    again = provider(gce).launch(request(p, "c2-r00001"))  # a restarted controller
    assert again.instance_id == first.instance_id
    assert len(inserts(gce)) == 1  # found by name, not inserted again
    # the fake honours requestId like the API: the same request id gives back the same operation
    body = {"name": "x-1", "machineType": "zones/us-central1-a/machineTypes/n1-standard-4", "disks": [{"boot": True}]}
    with gce.state.lock:
        one = gce.state.insert_instance("us-central1-a", body, request_uuid("r", "insert"))
        two = gce.state.insert_instance("us-central1-a", body, request_uuid("r", "insert"))
    assert one is two


def test_preemption_is_seen_before_and_after_the_vm_is_deleted(gce):
    p = provider(gce)
    lost = p.launch(request(p, "c2-r00002"))
    kept = p.launch(request(p, "c2-r00003", zone="us-central1-b"))
    gce.state.preempt("us-central1-a", lost.instance_id)
    states = {i.instance_id: i.state for i in p.list_instances("c2")}
    assert states == {lost.instance_id: "preempted", kept.instance_id: "running"}
    deadline = time.time() + 10
    while lost.instance_id in gce.state.instances["us-central1-a"] and time.time() < deadline:
        time.sleep(0.1)
    assert lost.instance_id not in gce.state.instances["us-central1-a"]  # termination action DELETE
    states = {i.instance_id: (i.state, i.end_reason) for i in p.list_instances("c2")}
    assert states[lost.instance_id] == (InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION)


def test_a_vm_that_powered_itself_off_is_an_agent_failure_and_another_stopped_vm_is_not(gce):
    p = provider(gce)
    failed = p.launch(request(p, "c2-r00005"))
    stopped = p.launch(request(p, "c2-r00006"))
    guest_reads = lambda: [q for method, path, q in gce.requests  # noqa: E731
                           if path.endswith("/operations") and "guestTerminate" in str(q.get("filter"))]
    p.list_instances("c2")
    assert guest_reads() == []  # nothing stopped: no second operations list
    gce.state.power_off("us-central1-a", failed.instance_id)
    with gce.state.lock:  # stopped some other way (a user's instances.stop): no guest operation
        gce.state.instances["us-central1-a"][stopped.instance_id]["status"] = "TERMINATED"
    seen = {i.instance_id: i for i in p.list_instances("c2")}
    assert (seen[failed.instance_id].state, seen[failed.instance_id].end_reason) == (
        InstanceState.TERMINATED, EndReason.AGENT_FAILED)
    assert seen[failed.instance_id].end_detail == SELF_SHUTDOWN_DETAIL and seen[failed.instance_id].ended_at
    assert (seen[stopped.instance_id].end_reason, seen[stopped.instance_id].end_detail) == (
        EndReason.ENDED_BY_PROVIDER, "terminated")
    assert guest_reads()
    assert failed.instance_id in gce.state.instances["us-central1-a"]  # kept (and its disk billed) until deleted


def test_terminate_is_idempotent_and_leaves_nothing_running(gce):
    p = provider(gce)
    instance = p.launch(request(p, "c2-r00004"))
    p.terminate(instance.instance_id)
    p.terminate(instance.instance_id)
    provider(gce).terminate("sp-never-launched")
    deadline = time.time() + 10
    while gce.state.live_instances() and time.time() < deadline:
        time.sleep(0.1)
    assert gce.state.live_instances() == []
    assert p.list_instances("c2") == []


@pytest.mark.parametrize("code, error", [("ZONE_RESOURCE_POOL_EXHAUSTED", CapacityError),
                                         ("QUOTA_EXCEEDED", QuotaError)])
def test_operation_errors_become_typed_errors(gce, code, error):
    p = provider(gce)
    gce.state.inject("us-central1-a", code)
    with pytest.raises(error, match=code):
        p.launch(request(p, "c2-r00005"))
    assert gce.state.all_instances() == []
    assert p.launch(request(p, "c2-r00006")).state == "running"  # the fault was for one insert


def test_credentials_missing_or_refused_fail_with_a_line_naming_gcp(gce, tmp_path, monkeypatch):
    provider(gce).check_credentials()  # a token from the fake's OAuth endpoint
    stranger = tmp_path / "stranger.json"
    info = json.loads((tmp_path / "gcp-key.json").read_text())
    from gce_fake import GceFakeServer, service_account_file

    other = GceFakeServer(PROJECT, GCE_ZONES)  # signs a key this fake does not know
    service_account_file(stranger, other, PROJECT)
    other.server_close()
    key = json.loads(stranger.read_text())
    stranger.write_text(json.dumps(dict(key, token_uri=info["token_uri"])))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(stranger))
    with pytest.raises(AuthError, match=r"^gcp: credentials refused"):
        provider(gce).check_credentials()
    with pytest.raises(AuthError, match=r"^gcp list: "):
        provider(gce).list_instances("c2")  # the API refuses the unknown key too (401)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    with pytest.raises(AuthError, match=r"^gcp: no credentials found"):
        provider(gce).check_credentials()


def test_instances_report_their_internal_and_nat_addresses(gce):
    p = provider(gce)
    instance = p.launch(request(p, "c2-r00010"))
    (nic,) = gce.state.instances["us-central1-a"][instance.instance_id]["networkInterfaces"]
    (nat,) = nic["accessConfigs"]
    assert instance.addresses == (f"/ip4/{nic['networkIP']}/tcp/31337", f"/ip4/{nat['natIP']}/tcp/31337")
    assert [i.addresses for i in p.list_instances("c2")] == [instance.addresses]


def test_live_peers_are_published_in_each_running_vms_metadata_keeping_its_other_items(gce):
    p = provider(gce)
    first, second = p.launch(request(p, "c2-r00020")), p.launch(request(p, "c2-r00021", "us-central1-b"))
    peers = [f"/ip4/10.128.0.{n}/tcp/31337/p2p/QmPeer{n}" for n in range(3)]
    p.publish_peers("c2", peers)
    for instance in (first, second):
        zone = instance.location.split(":", 1)[1]
        items = {i["key"]: i["value"] for i in gce.state.instances[zone][instance.instance_id]["metadata"]["items"]}
        assert items["spotrain-peers"].split() == peers
        assert {"user-data", "startup-script"} <= set(items)  # setMetadata replaces all: the rest is kept
    set_calls = [path for method, path, _ in gce.requests if path.endswith("/setMetadata")]
    assert len(set_calls) == 2
    p.publish_peers("c2", peers)  # unchanged: nothing rewritten
    assert len([path for method, path, _ in gce.requests if path.endswith("/setMetadata")]) == 2
    p.publish_peers("c2", peers[:1])
    zone = first.location.split(":", 1)[1]
    items = {i["key"]: i["value"] for i in gce.state.instances[zone][first.instance_id]["metadata"]["items"]}
    assert items["spotrain-peers"] == peers[0]


def test_a_vm_whose_metadata_changed_since_it_was_listed_is_left_for_the_next_tick(gce, monkeypatch):
    p = provider(gce)
    instance = p.launch(request(p, "c2-r00022"))
    zone = instance.location.split(":", 1)[1]
    real_set = gce.state.set_metadata

    def changed_meanwhile(zone_, name, body, request_id):
        gce.state.instances[zone_][name]["metadata"]["fingerprint"] = "changed-by-someone-else"
        return real_set(zone_, name, body, request_id)

    monkeypatch.setattr(gce.state, "set_metadata", changed_meanwhile)
    p.publish_peers("c2", ["/ip4/10.128.0.9/tcp/31337/p2p/QmPeer"])  # 412 from the API: no error, no write
    items = {i["key"] for i in gce.state.instances[zone][instance.instance_id]["metadata"]["items"]}
    assert "spotrain-peers" not in items
    monkeypatch.setattr(gce.state, "set_metadata", real_set)
    p.publish_peers("c2", ["/ip4/10.128.0.9/tcp/31337/p2p/QmPeer"])
    items = {i["key"] for i in gce.state.instances[zone][instance.instance_id]["metadata"]["items"]}
    assert "spotrain-peers" in items
