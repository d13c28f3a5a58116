"""The emulated multi-region cloud, built for real: namespaces, shaped links, NAT, cgroups, buckets."""

import os
import subprocess
import sys
import time

import pytest

from spotrain.providers.cgroups import CpuHierarchy
from spotrain.providers.geo_cloud import EmulatedCloud, host_problem
from spotrain.providers.geo_network import in_namespace, namespaces
from spotrain.providers.geo_plan import cloud_id, plan_cloud

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or host_problem() is not None,
                                reason=f"the emulated cloud needs root and its tools: {host_problem()}")

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9009)); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept(); n = 0
    while (data := c.recv(1 << 16)):
        n += len(data)
    c.sendall(str(n).encode()); c.close()
"""
# bytes per second of one transfer of argv[2] bytes, or the error's name
CLIENT = """
import socket, sys, time
try:
    start = time.monotonic()
    c = socket.create_connection((sys.argv[1], 9009), timeout=3)
    c.sendall(b"x" * int(sys.argv[2])); c.shutdown(socket.SHUT_WR)
    print(int(c.recv(100)) / (time.monotonic() - start))
except OSError as error:
    print(type(error).__name__)
"""
BUCKET = """
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
s3.put_object(Bucket=sys.argv[2], Key="k", Body=b"checkpoint")
print(s3.get_object(Bucket=sys.argv[2], Key="k")["Body"].read().decode())
"""
VMS = {"i-00000000000000a1": "us-east", "i-00000000000000a2": "us-east", "i-00000000000000b1": "eu-west"}


def run(argv: list[str]) -> str:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="emulated", AWS_SECRET_ACCESS_KEY="emulated")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env).stdout.strip()


def test_two_regions_a_controller_behind_nat_and_nothing_left(tmp_path):
    plan = plan_cloud(cloud_id(tmp_path, "net"), {"us-east": "198.18.1.0/24", "eu-west": "198.18.2.0/24"},
                      within_region_mbit=1000, between_regions_mbit=20, vm_cpus=0.25)
    cloud = EmulatedCloud(plan, tmp_path / "state")
    servers: list[subprocess.Popen] = []
    try:
        assert cloud.ensure(set()) and cloud.complete() and not cloud.ensure(set())  # built once, then kept
        address = {}
        for instance_id, region in VMS.items():
            address[instance_id] = cloud.add_vm(instance_id, region, set(address.values()))
        assert sorted(address.values()) == ["198.18.1.10", "198.18.1.11", "198.18.2.10"]
        a1, a2, b1 = VMS
        quota = CpuHierarchy.detect().quota(cloud.cgroups.group(plan.cloud, a1))
        for target in (a2, b1):
            servers.append(subprocess.Popen(cloud.vm_command(target, [sys.executable, "-c", SERVER]),
                                            stdout=subprocess.PIPE, text=True))
        servers.append(subprocess.Popen(in_namespace(plan.controller, [sys.executable, "-c", SERVER]),
                                        stdout=subprocess.PIPE, text=True))
        assert all(server.stdout.readline().strip() == "ready" for server in servers)
        assert quota == 0.25  # the kernel holds the VM's quota (v1 cfs_quota_us or v2 cpu.max)

        client = [sys.executable, "-c", CLIENT]
        within = float(run(cloud.vm_command(a1, [*client, address[a2], str(8_000_000)])))
        between = float(run(cloud.vm_command(a1, [*client, address[b1], str(1_500_000)])))
        print(f"within a region {within * 8 / 1e6:.0f} Mbit/s, between regions {between * 8 / 1e6:.1f} Mbit/s")
        assert between * 5 < within  # shaped at 20 against 1000: far apart, whatever the machine's load

        # the controller dials out (through NAT) ...
        assert float(run(in_namespace(plan.controller, [*client, address[b1], "1000"]))) > 0
        # ... and nothing dials in: not its address, not the NAT's addresses
        for target in (plan.controller_address, plan.nat_address, plan.regions[0].uplink[0]):
            assert run(cloud.vm_command(a1, [*client, target, "1000"])) in ("TimeoutError", "ConnectionRefusedError")
        assert run(cloud.vm_command(a1, [*client, plan.controller_address, "1000"])) == "TimeoutError"

        # a VM reaches its region's bucket (and the controller reaches every region's)
        region = plan.region("eu-west")
        bucket = [sys.executable, "-c", BUCKET, region.store_endpoint, region.name]
        assert run(cloud.vm_command(b1, bucket)) == "checkpoint"
        assert run(in_namespace(plan.controller, bucket)) == "checkpoint"

        cloud.release_vm(a1)  # a VM's end: its processes, cgroup and namespace go
        assert plan.vm_namespace(a1) not in namespaces()
        assert not cloud.cgroups.group(plan.cloud, a1).exists()
    finally:
        if len(servers) == 3:
            servers[2].kill()  # the controller's: it is no VM, so no cgroup of the cloud holds it
        cloud.teardown()
        for server in servers:
            server.wait(timeout=10)  # the VMs' were killed with their cgroups
    assert cloud.leftovers() == []
    assert not [n for n in namespaces() if n.startswith(plan.cloud)]


def test_a_crashed_clouds_leftovers_are_swept_at_the_next_build(tmp_path):
    plan = plan_cloud(cloud_id(tmp_path, "crash"), {"r-one": "198.18.7.0/24"}, 1000, 50, 0.5)
    cloud = EmulatedCloud(plan, tmp_path / "state")
    try:
        # what a run killed mid-build leaves: the core namespace, a VM's namespace and a process in its cgroup
        subprocess.run(["ip", "netns", "add", plan.core], check=True)
        subprocess.run(["ip", "netns", "add", plan.vm_namespace("i-00000000000000c1")], check=True)
        cloud.cgroups.make(plan.cloud, "i-00000000000000c1", 0.5)
        orphan = subprocess.Popen(cloud.vm_command("i-00000000000000c1", ["sleep", "600"]))
        time.sleep(0.5)
        assert not cloud.complete()
        assert cloud.ensure(set()) and cloud.complete()
        assert orphan.wait(timeout=10) == -9
        assert plan.vm_namespace("i-00000000000000c1") not in namespaces()
        # a complete cloud is kept, with the VMs still running, and without any other
        for instance_id in ("i-00000000000000c2", "i-00000000000000c3"):
            cloud.add_vm(instance_id, "r-one", set())
        assert not cloud.ensure({"i-00000000000000c2"})
        assert [n.rsplit("-", 1)[1] for n in cloud.network.vm_namespaces()] == ["00000000000000c2"]
    finally:
        cloud.teardown()
    assert cloud.leftovers() == []
