"""The emulated multi-region cloud, built from the kernel features real hosts use.

    controller ns (192.168.255.2) --veth-- core ns (router, NAT) --veth, tbf between-- region ns r0
                                                                                         br0 (gateway .1, S3 .2)
                                                                                         +-- veth, tbf within -- VM ns
                                                                --veth, tbf between-- region ns r1 ...

- Every VM is a network namespace with one veth into its region's bridge, shaped by `tc tbf` at
  the within-region rate on both ends (its upload and its download), and a cgroup with a CPU quota.
- A region is a namespace holding the bridge, the region's gateway and its object store (moto's
  S3 server, `geo_buckets.py`). Its uplink to the core router is shaped at the between-regions
  rate on both ends, so traffic between two regions crosses two such links.
- The core namespace routes between regions and is the controller's home router: it masquerades
  the controller's traffic and drops every new connection towards it (conntrack), so the
  controller dials out and nothing dials in, exactly a laptop's situation.
- The root namespace gets nothing: no link, no route, no rule. Processes enter a namespace with
  `nsenter --net` (the mounts stay the host's, so the cgroup tree stays visible).

`ip`, `tc` and `iptables` (iptables-nft) do the work; everything carries the cloud's prefix, and
`sweep()` removes whatever a crashed run left.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from spotrain.providers.cgroups import CpuHierarchy, kill_and_remove
from spotrain.providers.geo_plan import CONTROLLER_NET, CloudPlan, RegionPlan, bridge_port, tbf_arguments

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
TOOLS = ("ip", "tc", "iptables", "nsenter")


class NetworkError(RuntimeError):
    """A command that builds the cloud failed; one line naming the command."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check)


def in_namespace(namespace: str, argv: Sequence[str]) -> list[str]:
    """`argv` run in `namespace`'s network (only: mounts and the rest stay the host's)."""
    return ["nsenter", f"--net={NETNS_DIR / namespace}", "--", *argv]


def namespaces() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def same_namespace(name: str) -> bool:
    """True when this process already runs in `name`'s network namespace."""
    try:
        here, there = os.stat("/proc/self/ns/net"), os.stat(NETNS_DIR / name)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def entered(namespace: str) -> Iterator[None]:
    """This thread in `namespace`'s network until the block ends: sockets it opens meanwhile belong
    there (a network namespace is per thread; the process's other threads stay where they are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise NetworkError(f"cannot enter network namespace {namespace}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


class GeoNetwork:
    """Builds and removes one emulated cloud's namespaces, links, qdiscs, NAT rules and cgroups."""

    def __init__(self, plan: CloudPlan):
        self.plan = plan

    # -- the cloud ------------------------------------------------------------------------
    def complete(self) -> bool:
        return all(namespace_exists(name) for name in self.plan.namespaces())

    def build(self) -> None:
        """Core router, controller behind NAT, regions with their bridges and shaped uplinks."""
        plan = self.plan
        self._namespace(plan.core, forward=True)
        self._controller()
        for region in plan.regions:
            self._region(region)

    def _namespace(self, name: str, forward: bool = False) -> None:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        if forward:
            _run(in_namespace(name, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))

    def _veth(self, left_ns: str, left: str, right_ns: str, right: str) -> None:
        ip("-n", left_ns, "link", "add", left, "type", "veth", "peer", "name", right, "netns", right_ns)

    def _controller(self) -> None:
        plan, prefix = self.plan, CONTROLLER_NET.prefixlen
        self._namespace(plan.controller)
        self._veth(plan.core, "ctl0", plan.controller, "eth0")
        ip("-n", plan.core, "addr", "add", f"{plan.nat_address}/{prefix}", "dev", "ctl0")
        ip("-n", plan.core, "link", "set", "ctl0", "up")
        ip("-n", plan.controller, "addr", "add", f"{plan.controller_address}/{prefix}", "dev", "eth0")
        ip("-n", plan.controller, "link", "set", "eth0", "up")
        ip("-n", plan.controller, "route", "add", "default", "via", plan.nat_address)
        home = str(CONTROLLER_NET)
        for rule in (["-t", "nat", "-A", "POSTROUTING", "-s", home, "!", "-o", "ctl0", "-j", "MASQUERADE"],
                     ["-A", "FORWARD", "-o", "ctl0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                      "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-o", "ctl0", "-j", "DROP"],  # nothing dials in: a home router
                     ["-A", "INPUT", "-i", "ctl0", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"]):
            _run(in_namespace(plan.core, ["iptables", "-w", *rule]))

    def _region(self, region: RegionPlan) -> None:
        plan, name = self.plan, region.namespace
        self._namespace(name, forward=True)
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        for address in (region.gateway, region.store_address):
            ip("-n", name, "addr", "add", f"{address}/{region.subnet.prefixlen}", "dev", "br0")
        ip("-n", name, "link", "set", "br0", "up")
        core_side, region_side = region.uplink
        self._veth(plan.core, f"r{region.index}", name, "up0")
        ip("-n", plan.core, "addr", "add", f"{core_side}/30", "dev", f"r{region.index}")
        ip("-n", name, "addr", "add", f"{region_side}/30", "dev", "up0")
        ip("-n", plan.core, "link", "set", f"r{region.index}", "up")
        ip("-n", name, "link", "set", "up0", "up")
        ip("-n", name, "route", "add", "default", "via", core_side)
        ip("-n", plan.core, "route", "add", str(region.subnet), "via", region_side)
        # leaving the region, and entering it: each direction crosses one shaped link
        self._shape(name, "up0", plan.between_regions_mbit)
        self._shape(plan.core, f"r{region.index}", plan.between_regions_mbit)

    @staticmethod
    def _shape(namespace: str, device: str, rate_mbit: float) -> None:
        _run(["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", *tbf_arguments(rate_mbit)])

    # -- VMs ------------------------------------------------------------------------------
    def add_vm(self, instance_id: str, region_name: str, address: str) -> str:
        """The VM's namespace, linked into its region's bridge at `address`; returns its name."""
        region, name = self.plan.region(region_name), self.plan.vm_namespace(instance_id)
        port = bridge_port(instance_id)
        self._namespace(name)
        self._veth(region.namespace, port, name, "eth0")
        ip("-n", region.namespace, "link", "set", port, "master", "br0")
        ip("-n", region.namespace, "link", "set", port, "up")
        ip("-n", name, "addr", "add", f"{address}/{region.subnet.prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", region.gateway)
        self._shape(name, "eth0", self.plan.within_region_mbit)  # the VM's upload
        self._shape(region.namespace, port, self.plan.within_region_mbit)  # its download
        return name

    def remove_vm(self, instance_id: str, cgroups: CpuHierarchy | None) -> None:
        """Power off: every process in the VM's cgroup killed, the group and the namespace removed
        (its veth goes with it)."""
        if cgroups is not None:
            kill_and_remove(cgroups.group(self.plan.cloud, instance_id))
        name = self.plan.vm_namespace(instance_id)
        if namespace_exists(name):
            ip("netns", "del", name, check=False)

    def vm_namespaces(self) -> list[str]:
        own = set(self.plan.namespaces())
        return [n for n in namespaces() if n.startswith(self.plan.cloud + "-") and n not in own]

    # -- teardown ---------------------------------------------------------------------------
    def leftovers(self, cgroups: CpuHierarchy | None) -> list[str]:
        """What of this cloud exists: namespaces, and its cgroup tree."""
        found = [f"netns {n}" for n in namespaces() if n.startswith(self.plan.cloud + "-")]
        if cgroups is not None and cgroups.group(self.plan.cloud).exists():
            found.append(f"cgroup {cgroups.group(self.plan.cloud)}")
        return found

    def sweep(self, cgroups: CpuHierarchy | None) -> None:
        """Remove everything of this cloud: processes (through the cgroups), namespaces (their links,
        qdiscs and NAT rules go with them), cgroups."""
        if cgroups is not None:
            kill_and_remove(cgroups.group(self.plan.cloud))
        for name in namespaces():
            if name.startswith(self.plan.cloud + "-"):
                ip("netns", "del", name, check=False)
        left = [n for n in namespaces() if n.startswith(self.plan.cloud + "-")]
        if left:
            raise NetworkError(f"could not delete namespaces: {', '.join(left)}")
