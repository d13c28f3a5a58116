"""The emulated multi-region cloud's plan: names, addresses, link rates and CPU quotas.

Pure: nothing here touches the system. `geo_network.py` builds what this plans.

Every name starts with the cloud's id, `spg-<10 hex>` (a hash of $SPOTRAIN_HOME and the cluster),
so two clusters, or two test homes, never share a namespace or a cgroup, and cleanup finds
everything of one cloud by its prefix alone.

Addresses: the regions' VMs live in 198.18.0.0/16 (the spec gives each region a subnet there:
.1 is the region's gateway, .2 its object store, VMs from .10); region k's uplink to the core
router is 198.19.k.0/30 (core .1, region .2); the controller sits on 192.168.255.0/30, a home
network behind the core's NAT. All of it exists only inside the cloud's namespaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_network
from pathlib import Path

PREFIX = "spg-"
REGION_SPACE = IPv4Network("198.18.0.0/16")  # where region subnets may lie (RFC 2544's benchmark range)
UPLINK_SPACE = IPv4Network("198.19.0.0/16")  # core <-> region links, one /30 each
CONTROLLER_NET = IPv4Network("192.168.255.0/30")  # the laptop's home network, behind the core's NAT
STORE_PORT = 9000
FIRST_VM_HOST = 10  # .1 gateway, .2 store, the rest below .10 kept free
MAX_REGIONS = 64
CPU_PERIOD_US = 100_000


class PlanError(ValueError):
    """A region layout the emulated cloud cannot build; one line."""


def cloud_id(home: Path, cluster: str) -> str:
    """`spg-` and ten hex digits of the home and cluster: the prefix of everything this cloud makes."""
    digest = hashlib.sha256(f"{Path(home).resolve()}\0{cluster}".encode()).hexdigest()
    return PREFIX + digest[:10]


def check_subnets(subnets: Mapping[str, str]) -> dict[str, IPv4Network]:
    """Each region's subnet, parsed: IPv4, inside 198.18.0.0/16, room for VMs, no two overlapping."""
    if len(subnets) > MAX_REGIONS:
        raise PlanError(f"at most {MAX_REGIONS} regions, got {len(subnets)}")
    parsed: dict[str, IPv4Network] = {}
    for region, text in subnets.items():
        try:
            network = ip_network(text, strict=True)
        except ValueError as error:
            raise PlanError(f"{region}: subnet {text!r}: {error}") from None
        if not isinstance(network, IPv4Network) or not network.subnet_of(REGION_SPACE):
            raise PlanError(f"{region}: subnet {text} must lie inside {REGION_SPACE}")
        if network.prefixlen > 27:
            raise PlanError(f"{region}: subnet {text} is too small (at most /27)")
        for other, seen in parsed.items():
            if network.overlaps(seen):
                raise PlanError(f"{region}: subnet {text} overlaps {other}'s {seen}")
        parsed[region] = network
    return parsed


@dataclass(frozen=True)
class RegionPlan:
    name: str
    index: int
    namespace: str
    subnet: IPv4Network

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def store_address(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def store_endpoint(self) -> str:
        """The region's S3 endpoint, as a checkpoint store URL names it (`?endpoint=...`)."""
        return f"http://{self.store_address}:{STORE_PORT}"

    @property
    def uplink(self) -> tuple[str, str]:
        """(core side, region side) addresses of the region's /30 to the core router."""
        base = UPLINK_SPACE.network_address + 256 * self.index
        return str(base + 1), str(base + 2)

    def vm_addresses(self) -> Iterable[str]:
        first = self.subnet.network_address + FIRST_VM_HOST
        return (str(first + n) for n in range(self.subnet.num_addresses - FIRST_VM_HOST - 1))


@dataclass(frozen=True)
class CloudPlan:
    cloud: str  # the prefix: cloud_id()
    regions: tuple[RegionPlan, ...]
    within_region_mbit: float
    between_regions_mbit: float
    vm_cpus: float

    @property
    def core(self) -> str:
        return f"{self.cloud}-core"

    @property
    def controller(self) -> str:
        return f"{self.cloud}-ctl"

    @property
    def controller_address(self) -> str:
        return str(CONTROLLER_NET.network_address + 2)

    @property
    def nat_address(self) -> str:
        """The core's side of the controller's link: its default gateway, the NAT."""
        return str(CONTROLLER_NET.network_address + 1)

    def region(self, name: str) -> RegionPlan:
        for region in self.regions:
            if region.name == name:
                return region
        raise PlanError(f"no region {name!r} in this cloud")

    def vm_namespace(self, instance_id: str) -> str:
        return f"{self.cloud}-{instance_id}"

    def free_address(self, region: str, used: set[str]) -> str:
        """The region's lowest VM address no live VM holds."""
        for address in self.region(region).vm_addresses():
            if address not in used:
                return address
        raise PlanError(f"region {region}: no free address left in {self.region(region).subnet}")

    def namespaces(self) -> list[str]:
        """The cloud's own namespaces (the VMs' come and go)."""
        return [self.core, self.controller, *(r.namespace for r in self.regions)]


def plan_cloud(cloud: str, subnets: Mapping[str, str], within_region_mbit: float, between_regions_mbit: float,
               vm_cpus: float) -> CloudPlan:
    parsed = check_subnets(subnets)
    regions = tuple(RegionPlan(name, index, f"{cloud}-r{index}", network)
                    for index, (name, network) in enumerate(parsed.items()))
    return CloudPlan(cloud, regions, within_region_mbit, between_regions_mbit, vm_cpus)


def bridge_port(instance_id: str) -> str:
    """The VM's link as its region's bridge names it (interface names hold at most 15 bytes)."""
    return "v" + instance_id.removeprefix("i-")[-12:]


def tbf_arguments(rate_mbit: float) -> list[str]:
    """tc's tbf at `rate_mbit`: a bucket of at least one timer tick of traffic and a GSO super-packet."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes / 250), 64 * 1024)
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


def cpu_quota_us(cpus: float, period_us: int = CPU_PERIOD_US) -> int:
    """CFS quota per period for `cpus` CPUs (cgroup v1 cpu.cfs_quota_us, v2 cpu.max's first field)."""
    return max(1000, round(cpus * period_us))
