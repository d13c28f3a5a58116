"""One cluster's emulated multi-region cloud: its network, its VMs' cgroups and its regions' buckets.

The local provider uses it in `network: namespaces` mode: `ensure()` before the controller starts
(an incomplete cloud, a crashed run's, is swept and rebuilt; a complete one is kept, with its VMs
and its buckets, for a relaunched controller to adopt), `add_vm`/`vm_command` at launch,
`release_vm` when a VM has ended, `teardown()` at `spotrain down`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from spotrain.providers.cgroups import CgroupError, CpuHierarchy
from spotrain.providers.geo_buckets import in_cgroup, start_store, store_running
from spotrain.providers.geo_network import TOOLS, GeoNetwork, in_namespace, namespace_exists
from spotrain.providers.geo_plan import CloudPlan, cloud_id, plan_cloud


def host_problem() -> str | None:
    """Why this machine cannot build an emulated cloud, in one line; None when it can."""
    if os.geteuid() != 0:
        return ("providers.local.network: namespaces needs root (network namespaces, tc qdiscs, iptables NAT, "
                "cgroups); run as root, or use network: host")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"providers.local.network: namespaces needs {', '.join(missing)} (apt-get install iproute2 iptables)"
    try:
        CpuHierarchy.detect()
    except CgroupError as error:
        return f"providers.local.network: namespaces: {error}"
    try:
        import moto.server  # noqa: F401 - the regions' S3 servers
    except ImportError:
        return "providers.local.network: namespaces needs moto's S3 server: pip install 'moto[server]'"
    return None


def plan_for(config, home: Path, cluster: str) -> CloudPlan:
    """The cloud a spec's `providers.local` (spotrain.config.LocalProvider) describes."""
    subnets = {name: region.subnet or "" for name, region in config.regions.items()}
    return plan_cloud(cloud_id(home, cluster), subnets, config.links.within_region_mbit,
                      config.links.between_regions_mbit, config.vm_cpus)


class EmulatedCloud:
    def __init__(self, plan: CloudPlan, state_dir: Path):
        self.plan = plan
        self.network = GeoNetwork(plan)
        self.state_dir = state_dir  # the S3 servers' logs
        self._cgroups: CpuHierarchy | None = None

    @property
    def cgroups(self) -> CpuHierarchy:
        if self._cgroups is None:
            self._cgroups = CpuHierarchy.detect()
        return self._cgroups

    def complete(self) -> bool:
        return self.network.complete() and all(store_running(self.plan, r, self.cgroups) for r in self.plan.regions)

    def ensure(self, live_vms: set[str]) -> bool:
        """The cloud, built when it is not complete; True when it was (re)built. A complete cloud is
        kept with the VMs in `live_vms` (a relaunched controller adopts them); any other VM it holds
        is a crashed run's leftover and is powered off."""
        if self.complete():
            for namespace in self.network.vm_namespaces():
                instance_id = namespace.removeprefix(self.plan.cloud + "-")
                if instance_id not in live_vms:
                    self.release_vm(instance_id)
            return False
        self.teardown()  # a crashed run's leftovers (and VMs in a cloud that lost a part) go first
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.network.build()
            for region in self.plan.regions:
                start_store(self.plan, region, self.cgroups, self.state_dir / f"s3-{region.name}.log")
        except BaseException:
            self.teardown()
            raise
        return True

    def add_vm(self, instance_id: str, region: str, used: set[str]) -> str:
        """A VM in `region` at its lowest free address (not in `used`); returns the address."""
        address = self.plan.free_address(region, used)
        try:
            self.cgroups.make(self.plan.cloud, instance_id, self.plan.vm_cpus)  # its "instance size"
            self.network.add_vm(instance_id, region, address)
        except BaseException:
            self.release_vm(instance_id)
            raise
        return address

    def vm_command(self, instance_id: str, argv: list[str]) -> list[str]:
        """`argv` as a process of the VM (`add_vm`): in its cgroup (its CPU quota) and its namespace."""
        group = self.cgroups.group(self.plan.cloud, instance_id)
        return in_cgroup(group, in_namespace(self.plan.vm_namespace(instance_id), argv))

    def vm_exists(self, instance_id: str) -> bool:
        return namespace_exists(self.plan.vm_namespace(instance_id))

    def release_vm(self, instance_id: str) -> None:
        """The VM's processes, cgroup and namespace gone (idempotent)."""
        self.network.remove_vm(instance_id, self.cgroups)

    def teardown(self) -> None:
        self.network.sweep(self.cgroups)

    def leftovers(self) -> list[str]:
        return self.network.leftovers(self.cgroups)
