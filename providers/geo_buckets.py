"""The emulated cloud's object stores: one S3 server (moto's) per region, one bucket each.

A region's server listens on the region's store address (`RegionPlan.store_endpoint`) inside the
region's namespace and runs in the cloud's cgroup tree (`<cloud>/store-r<k>`), so the cloud's
teardown stops it with everything else. Its bucket is named after the region. moto keeps objects
in memory: the buckets live as long as the cloud, until `spotrain down`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from spotrain.providers.cgroups import CpuHierarchy, procs
from spotrain.providers.geo_network import NetworkError, entered, in_namespace
from spotrain.providers.geo_plan import STORE_PORT, CloudPlan, RegionPlan

STORE_CPUS = 1.0
START_TIMEOUT_SECONDS = 60.0
# moto takes any key: the cloud's VMs and its controller get these as an instance role gives real
# ones (no secret)
EMULATED_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "emulated", "AWS_SECRET_ACCESS_KEY": "emulated",
                        "AWS_DEFAULT_REGION": "us-east-1"}


def store_group(region: RegionPlan) -> str:
    return f"store-r{region.index}"


def in_cgroup(group: Path, argv: list[str]) -> list[str]:
    """`argv` started inside `group` (the shell joins it, then becomes the command: one pid)."""
    return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *argv]


def store_running(plan: CloudPlan, region: RegionPlan, cgroups: CpuHierarchy) -> bool:
    return bool(procs(cgroups.group(plan.cloud, store_group(region)))) and _answers(region)


def _answers(region: RegionPlan) -> bool:
    with entered(region.namespace), socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((region.store_address, STORE_PORT)) == 0


def start_store(plan: CloudPlan, region: RegionPlan, cgroups: CpuHierarchy, log: Path) -> None:
    """The region's S3 server, answering, with its bucket."""
    group = cgroups.make(plan.cloud, store_group(region), STORE_CPUS)
    server = [sys.executable, "-m", "moto.server", "-H", region.store_address, "-p", str(STORE_PORT)]
    with open(log, "ab") as out:
        process = subprocess.Popen(in_cgroup(group, in_namespace(region.namespace, server)), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not _answers(region):
        if process.poll() is not None or time.monotonic() > deadline:
            raise NetworkError(f"the S3 server of region {region.name} did not start (see {log})")
        time.sleep(0.2)
    make_bucket(region)


def make_bucket(region: RegionPlan) -> None:
    import boto3

    with entered(region.namespace):
        client = boto3.client("s3", endpoint_url=region.store_endpoint,
                              region_name=EMULATED_CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=EMULATED_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=EMULATED_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=region.name)
