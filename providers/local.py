"""The embedded default provider: each "VM" is a supervisor process on this machine.

Its cloud state lives under $SPOTRAIN_HOME/local-cloud/vms/<instance-id>/ (vm.json, state.json,
user-data.json, logs), so any process can list, adopt or terminate the instances, exactly as
it would through a cloud API. Prices are fixed per location; preemptions replay a real trace.

With `network: namespaces` the VMs live in an emulated multi-region cloud (geo_cloud.py): each
its own network namespace, address and CPU quota, its region's links shaped, its disk (the work
folder) gone when it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrain.contracts.live_peers import peers_value
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.base import AuthError, Instance, LaunchRequest, Offer
from spotrain.providers.geo_buckets import EMULATED_CREDENTIALS
from spotrain.providers.local_schedule import claim_lifetime
from spotrain.providers.local_vm import INTERRUPT_FILE, PEERS_FILE, write_json_atomic

if TYPE_CHECKING:
    from spotrain.providers.geo_cloud import EmulatedCloud

NAME = "local"


def instance_id_for(request_id: str) -> str:
    return "i-" + hashlib.sha256(request_id.encode()).hexdigest()[:16]


def _pid_runs(pid: int, vm_dir: Path) -> bool:
    """True when `pid` is alive and is this VM's supervisor (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and str(vm_dir).encode() in cmdline


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except FileNotFoundError:
        return False


def _end_reason(state: dict) -> tuple[EndReason | None, str]:
    """A supervisor's end reason and detail; one started by an older spotrain wrote other words."""
    text, detail = state.get("end_reason"), state.get("end_detail", "")
    if text is None:
        return None, detail
    try:
        return EndReason(text), detail
    except ValueError:
        return EndReason.ENDED_BY_PROVIDER, text


class LocalProvider:
    name = NAME

    def __init__(self, config, root: Path, workload: list[str] | None = None,
                 python_path: tuple[str, ...] = ()):
        self.config = config  # spotrain.config.LocalProvider
        self.root = root
        self.workload = workload  # what a VM runs; None: `spotrain agent` with the request's user-data
        # folders put first on the agents' PYTHONPATH (the spec's code_dir): agents run in their VM folder
        self.python_path = python_path
        self.vms = root / "vms"
        # notice window, then the supervisor's poll and exit
        self.termination_lag_seconds = config.notice_seconds + 3.0
        self.geo = config.network == "namespaces"
        self._clouds: dict[str, EmulatedCloud] = {}

    def check_credentials(self) -> None:
        """Nothing to check on the host network; the emulated cloud needs root and its tools."""
        if self.geo:
            from spotrain.providers.geo_cloud import host_problem

            problem = host_problem()
            if problem:
                raise AuthError(problem)

    def cloud(self, cluster: str) -> EmulatedCloud:
        """The cluster's emulated cloud (`network: namespaces` only)."""
        if cluster not in self._clouds:
            from spotrain.providers.geo_cloud import EmulatedCloud, plan_for

            plan = plan_for(self.config, self.root, cluster)
            self._clouds[cluster] = EmulatedCloud(plan, self.root / "geo" / plan.cloud)
        return self._clouds[cluster]

    def region_of(self, location: str) -> str | None:
        """The region of a local location ("local:zone"): where egress between VMs is attributed."""
        zone = location.partition(":")[2]
        return self.config.locations[zone].region if zone in self.config.locations else None

    def release_cluster(self, cluster: str) -> None:
        """What the cluster holds besides instances: the emulated cloud's network, cgroups and buckets."""
        if self.geo:
            self.cloud(cluster).teardown()

    def offers(self) -> list[Offer]:
        return [
            Offer(NAME, f"{NAME}:{zone}", "local.cpu", None, location.price_usd_per_hour)
            for zone, location in self.config.locations.items()
        ]

    def launch(self, request: LaunchRequest) -> Instance:
        instance_id = instance_id_for(request.request_id)
        vm_dir = self.vms / instance_id
        self.vms.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.vms, 0o700)  # each VM's folder holds its identity: no other user looks in
        with open(self.root / "launch.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one launch per request id, even across processes
            if not (vm_dir / "vm.json").exists():
                self._create_vm(request, instance_id, vm_dir)
        return self._instance(vm_dir)

    def _create_vm(self, request: LaunchRequest, instance_id: str, vm_dir: Path) -> None:
        zone = request.offer.location.split(":", 1)[1]
        location = self.config.locations[zone]
        now = time.time()
        claim = claim_lifetime(
            self.root / "schedule.json", zone, location.trace, now, self.config.time_compression,
            location.trace_offset_hours * 3600.0, self.config.unannounced_every,
        )
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        command = [sys.executable, "-m", "spotrain.providers.local_vm", str(vm_dir)]
        env, geo = dict(os.environ), dict[str, Any]()
        if self.geo:
            geo, command = self._geo_vm(request.cluster, instance_id, location.region, command)
            env.update(EMULATED_CREDENTIALS)
        # the supervisor gives the agent its metadata service through the environment
        # every interface, as on a cloud VM; peers reach it at 127.0.0.1 on this machine, else its address
        user_data = request.user_data.for_vm(location=request.offer.location, instance_id=instance_id,
                                             host="0.0.0.0", announce_host=geo.get("address", "127.0.0.1"))
        write_json_atomic(vm_dir / "user-data.json", user_data.wire())
        vm = {
            "instance_id": instance_id, "request_id": request.request_id, "cluster": request.cluster,
            "location": request.offer.location, "zone": zone, "price_usd_per_hour": request.offer.spot_usd_per_hour,
            "launched_at": now, "notice_seconds": self.config.notice_seconds,
            "preempt_at": None if claim.lifetime_wall_s is None else now + claim.lifetime_wall_s,
            "announced": claim.announced, "trace": location.trace, "trace_node": claim.trace_node,
            "workload": self.workload, "python_path": list(self.python_path), **geo,
        }
        with open(vm_dir / "supervisor.log", "ab") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # the VM outlives the controller that launched it
            )
        write_json_atomic(vm_dir / "state.json",
                          {"state": InstanceState.RUNNING.value, "pid": process.pid, "launched_at": now})
        write_json_atomic(vm_dir / "vm.json", vm)  # its presence means "launched"
        self._wait_until_booted(vm_dir, process)

    def _geo_vm(self, cluster: str, instance_id: str, region: str | None,
                command: list[str]) -> tuple[dict[str, Any], list[str]]:
        """The VM's namespace at a free address of its region; what vm.json records of it, and its
        supervisor's command (in the VM's cgroup and namespace).

        Seam for code shipping: the supervisor and its agent run from this host's interpreter and
        code, which the VM's processes share; a VM that installs what the controller shipped
        replaces `command`'s interpreter with its own."""
        assert region is not None  # the spec puts every location in a region (config.LocalProvider)
        cloud = self.cloud(cluster)
        used = {vm["address"] for vm in self._cluster_vms(cluster)
                if vm.get("address") and cloud.vm_exists(vm["instance_id"])}
        address = cloud.add_vm(instance_id, region, used)
        return ({"network": "namespaces", "region": region, "address": address, "ephemeral_disk": True,
                 "cloud": cloud.plan.cloud}, cloud.vm_command(instance_id, command))

    def _cluster_vms(self, cluster: str) -> list[dict]:
        found = []
        for vm_file in self.vms.glob("*/vm.json"):
            try:
                vm = json.loads(vm_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if vm.get("cluster") == cluster:
                found.append(vm)
        return found

    @staticmethod
    def _wait_until_booted(vm_dir: Path, process: subprocess.Popen, timeout: float = 30.0) -> None:
        """Like a cloud's pending -> running: back once the supervisor serves metadata and handles SIGTERM."""
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            if "imds_url" in json.loads((vm_dir / "state.json").read_text()):
                return
            time.sleep(0.05)

    def _instance(self, vm_dir: Path) -> Instance:
        vm = json.loads((vm_dir / "vm.json").read_text())
        state = json.loads((vm_dir / "state.json").read_text())
        status, ended_at = InstanceState(state["state"]), state.get("ended_at")
        reason, detail = _end_reason(state)
        if status == InstanceState.RUNNING and not _pid_runs(state["pid"], vm_dir):
            status, ended_at = InstanceState.TERMINATED, (vm_dir / "state.json").stat().st_mtime
            reason, detail = EndReason.VM_LOST, ""
        if status != InstanceState.RUNNING and vm.get("network") == "namespaces":
            self._release(vm, vm_dir)
        addresses: tuple[str, ...] = ()
        address_file = vm_dir / "work" / "swarm-addresses.json"
        if status == InstanceState.RUNNING and address_file.exists():
            try:
                addresses = tuple(json.loads(address_file.read_text()))
            except (json.JSONDecodeError, OSError):
                addresses = ()
        return Instance(
            instance_id=vm["instance_id"], request_id=vm["request_id"], cluster=vm["cluster"],
            location=vm["location"], price_usd_per_hour=vm["price_usd_per_hour"], state=status,
            launched_at=vm["launched_at"], ended_at=ended_at, end_reason=reason, end_detail=detail,
            addresses=addresses,
        )

    def _release(self, vm: dict, vm_dir: Path) -> None:
        """An ended VM of the emulated cloud: its processes, namespace and cgroup gone, its disk deleted."""
        if self.geo and self.cloud(vm["cluster"]).plan.cloud == vm.get("cloud"):
            self.cloud(vm["cluster"]).release_vm(vm["instance_id"])
        shutil.rmtree(vm_dir / "work", ignore_errors=True)

    def list_instances(self, cluster: str) -> list[Instance]:
        found = []
        for vm_file in sorted(self.vms.glob("*/vm.json")):
            try:
                if json.loads(vm_file.read_text())["cluster"] == cluster:
                    found.append(self._instance(vm_file.parent))
            except (OSError, json.JSONDecodeError, KeyError):
                continue  # a VM being written right now shows up on the next call
        return found

    def publish_peers(self, cluster: str, peers: list[str]) -> None:
        """Each running VM's IMDS serves these as the `spotrain:peers` tag (local_vm.PEERS_FILE)."""
        value = peers_value(peers)
        for instance in self.list_instances(cluster):
            peers_file = self.vms / instance.instance_id / PEERS_FILE
            if instance.state == InstanceState.RUNNING and not _same_text(peers_file, value):
                tmp = peers_file.with_name(PEERS_FILE + ".tmp")
                tmp.write_text(value)
                os.replace(tmp, peers_file)

    def terminate(self, instance_id: str) -> None:
        vm_dir = self.vms / instance_id
        try:
            state = json.loads((vm_dir / "state.json").read_text())
        except FileNotFoundError:
            return
        if state["state"] == InstanceState.RUNNING and _pid_runs(state["pid"], vm_dir):
            try:
                os.kill(state["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass

    def interrupt(self, instance_id: str, notice: bool = True) -> None:
        """Reclaim a running VM now, as a cloud's fault injection does (AWS FIS's spot interruption):
        with the notice window, or without a notice at all."""
        vm_dir = self.vms / instance_id
        if (vm_dir / "vm.json").exists():
            write_json_atomic(vm_dir / INTERRUPT_FILE, {"notice": notice})

    def console_output(self, instance_id: str, location: str = "") -> str:
        """The VM's agent log: what a cloud VM's serial console shows of its agent."""
        try:
            return (self.vms / instance_id / "agent.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
