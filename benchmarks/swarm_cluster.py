"""A SWARM on this machine for benchmarks: real `spotrain agent` processes (stage peers and a
trainer) on 127.0.0.1, each stage peer in its own cgroup-v1 CPU cgroup with a fixed quota, so
peers behave like separate machines of a given speed on a shared box (needs root).

The cluster reads the swarm through a `SwarmView` DHT peer (as the controller does): stage records
and the trainer's status, whose `samples` count the microbatches' samples the trainer completed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from spotrain.access import ClusterAccess
from spotrain.contracts.agent_config import AgentConfig
from spotrain.contracts.stage_records import StageRecord, found_stage_records, latest_records, stages_key
from spotrain.contracts.states import AgentState
from spotrain.providers.cgroups import CgroupError, kill_and_remove, procs
from spotrain.swarm_view import SwarmView

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000


@dataclass
class Peer:
    name: str
    process: subprocess.Popen[bytes]
    cgroup: Path | None


@dataclass
class LocalSwarm:
    work: Path
    task: str
    stages: int
    rebalance_seconds: float
    rebalance: bool = True  # False: stage peers never move
    cluster: str = "bench-swarm"
    max_in_flight: int = 8  # the trainer's microbatches in flight
    peers: dict[str, Peer] = field(default_factory=dict)
    view: SwarmView | None = None
    access: ClusterAccess | None = None

    def start_view(self) -> None:
        self.access = ClusterAccess(self.work / "controller", self.cluster)
        self.view = SwarmView(self.cluster, self.access)

    def _admission(self, name: str) -> dict[str, str]:
        """Admit `name` beside every peer started so far (the gate refuses anyone else)."""
        assert self.view is not None and self.access is not None
        record, expires, each = self.access.admit_only([*self.peers, name], time.time(), 2.0)
        self.view.publish_admission(record, expires)
        return each[name]

    def user_data(self, name: str, role: str) -> AgentConfig:
        """The agent's config as a controller writes it: the typed contract, checked here, not on the VM."""
        assert self.view is not None
        return AgentConfig.model_validate({
                "cluster": self.cluster, "instance_id": name, "initial_peers": self.view.addresses(),
                "admission": self._admission(name),
                "task": self.task, "torch_threads": 1, "sigterm_grace_seconds": 5.0,
                "training": {"batch_size": 4, "target_batch_size": 64, "matchmaking_time": 2.0,
                             "averaging_timeout": 10.0,
                             "compression": {"gradients": "none", "state": "float16", "activations": "blockwise8"}},
                "mode": "swarm",
                "pipeline": {"role": role, "stages": self.stages, "max_in_flight": self.max_in_flight,
                             "rebalance": self.rebalance, "rebalance_seconds": self.rebalance_seconds},
                "checkpoint": {"store": str(self.work / "store"), "every_epochs": 5}})

    def start(self, name: str, role: str, cgroup: bool) -> None:
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "user-data.json").write_text(self.user_data(name, role).to_json())
        group = _make_cgroup(f"spotrain-bench-{os.getpid()}-{name}") if cgroup else None

        def enter_cgroup() -> None:  # in the child before exec: every process it starts stays in the cgroup
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        log = open(folder / "agent.log", "wb")  # noqa: SIM115 - the child holds it
        process = subprocess.Popen([sys.executable, "-m", "spotrain", "agent", "--user-data", "user-data.json"],
                                   cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=enter_cgroup, env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.peers[name] = Peer(name, process, group)

    def set_quota(self, cores: float, names: Iterable[str] | None = None, period_us: int = CFS_PERIOD_US) -> None:
        """The CPU quota of `names` (default: every peer in a cgroup) from now on (-1: unlimited), per
        `period_us`. A short period keeps a peer that was idle from running a whole microbatch at
        full speed on the quota it saved, which makes it measure itself many times faster than
        its quota (a real slow machine is slow for every microbatch)."""
        for name in self.peers if names is None else names:
            group = self.peers[name].cgroup
            if group is not None:
                quota = -1 if cores < 0 else max(int(cores * period_us), 1000)  # the kernel's minimum: 1 ms
                (group / "cpu.cfs_quota_us").write_text("-1")  # the period may only shrink below a set quota
                (group / "cpu.cfs_period_us").write_text(str(period_us))
                (group / "cpu.cfs_quota_us").write_text(str(quota))

    def set_weight(self, shares: int, names: Iterable[str] | None = None) -> None:
        """cpu.shares of `names` (default 1024, a root process's): on a machine loaded by other work a
        heavy weight lets a peer get what its quota allows, so the quota binds, not the contention."""
        for name in self.peers if names is None else names:
            group = self.peers[name].cgroup
            if group is not None:
                (group / "cpu.shares").write_text(str(shares))

    def cpu(self) -> dict[str, CpuUse]:
        """Each live peer's CPU so far: seconds its processes used (p2pd and the DHT's included) and
        the quota periods it ran in and was throttled in (the kernel's cpu.stat)."""
        found = {}
        for name, peer in self.peers.items():
            if peer.cgroup is None or peer.process.poll() is not None:
                continue
            stat = dict(line.split() for line in (peer.cgroup / "cpu.stat").read_text().splitlines())
            parts: dict[str, float] = {}
            for pid in procs(peer.cgroup):
                kind = _process_kind(pid, peer.process.pid)
                parts[kind] = parts.get(kind, 0.0) + _cpu_seconds(pid)
            found[name] = CpuUse(time.monotonic(), sum(parts.values()), int(stat["nr_periods"]),
                                 int(stat["nr_throttled"]), parts)
        return found

    def kill(self, name: str) -> None:
        """Without notice: the peer's whole process group at once, as a VM that vanishes."""
        peer = self.peers[name]
        _kill_group(peer.process)

    def records(self, reads: int = 1, pause: float = 1.0) -> list[StageRecord]:
        """Each peer's newest fresh stage record over `reads` reads `pause` s apart: one read misses
        records now and then (a peer's refresh late on its 0.1-core quota; a run read 3/3 at the
        kill while the counts a second later were 4/4)."""
        assert self.view is not None
        newest: dict[str, StageRecord] = {}
        for read in range(reads):
            if read:
                time.sleep(pause)
            found = self.view.dht.get(stages_key(self.cluster), latest=True)
            for record in latest_records(found_stage_records(found), time.time(), ttl=10.0):
                if record.peer_id not in newest or record.time > newest[record.peer_id].time:
                    newest[record.peer_id] = record
        return list(newest.values())

    def serving(self, reads: int = 1) -> dict[int, list[StageRecord]]:
        by_stage: dict[int, list[StageRecord]] = {}
        for record in self.records(reads):
            if record.state == AgentState.TRAINING:
                by_stage.setdefault(record.stage, []).append(record)
        return by_stage

    def trainer_samples(self, name: str) -> tuple[float, int] | None:
        """(status time, samples completed) of the trainer's newest status record."""
        assert self.view is not None
        status = self.view.statuses().get(name)
        return None if status is None else (status.time, status.samples)

    def served(self) -> dict[str, int]:
        """Microbatch calls each stage peer answered so far, by its newest status record."""
        assert self.view is not None
        return {name: status.served for name, status in self.view.statuses().items() if name in self.peers}

    def throughput(self, trainer: str, seconds: float) -> float:
        """Samples/s the trainer completed over about `seconds`, from its own status records."""
        first = self._sample(trainer)
        time.sleep(seconds)
        last = self._sample(trainer)
        return (last[1] - first[1]) / max(last[0] - first[0], 1e-9)

    def _sample(self, trainer: str) -> tuple[float, int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self.trainer_samples(trainer)
            if found is not None:
                return found
            time.sleep(0.5)
        raise RuntimeError(f"no status from {trainer}")

    def stop(self) -> None:
        for peer in self.peers.values():
            if peer.process.poll() is None:
                peer.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for peer in self.peers.values():
            try:
                peer.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(peer.process)
            if peer.cgroup is not None:
                _remove_cgroup(peer.cgroup)
        if self.view is not None:
            self.view.shutdown()


@dataclass(frozen=True)
class CpuUse:
    at: float  # time.monotonic()
    seconds: float  # CPU seconds of the processes alive in the group (user + system)
    periods: int
    throttled: int
    parts: dict[str, float] = field(default_factory=dict)  # CPU seconds by `_process_kind`

    def since(self, before: CpuUse) -> dict[str, float]:
        """Cores used between two readings (in all, and by the agent's own process, p2pd and the
        agent's children: its DHT and averagers) and the share of quota periods that were throttled
        (the quota bound when that share is large). A process that ended in between is not counted."""
        periods = self.periods - before.periods
        elapsed = max(self.at - before.at, 1e-9)
        parts = {f"{kind}_cores": (seconds - before.parts.get(kind, 0.0)) / elapsed
                 for kind, seconds in self.parts.items()}
        return {"cores": (self.seconds - before.seconds) / elapsed, **parts,
                "throttled_share": (self.throttled - before.throttled) / periods if periods > 0 else 0.0}


def _process_kind(pid: int, agent_pid: int) -> str:
    """"agent" (the agent's own process: serving and training), "p2pd", or "children" (the DHT's
    and the averagers' processes)."""
    if pid == agent_pid:
        return "agent"
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "children"
    return "p2pd" if name == "p2pd" else "children"


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0  # ended meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _make_cgroup(name: str) -> Path:
    group = CGROUP_ROOT / name
    group.mkdir()
    (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    return group


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _remove_cgroup(group: Path) -> None:
    """Kill whatever still runs in the cgroup (a process that left the agent's group), then remove it."""
    try:
        kill_and_remove(group)
    except (CgroupError, OSError) as error:
        print(f"cgroup {group} left in place: {error}", file=sys.stderr)
