"""CPU-quota cgroups for the emulated cloud's VMs: cgroup v1 (`cpu.cfs_quota_us`) or v2 (`cpu.max`).

Which one a machine has is found once: v2 when /sys/fs/cgroup is the unified hierarchy with the
cpu controller, else v1's cpu hierarchy (hybrid machines mount an empty v2 tree beside v1; the cpu
controller then lives in v1). A VM's group is `<cloud>/<instance id>`; every process started
in it stays in it (p2pd included), so killing the group is the VM's power switch.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from spotrain.providers.geo_plan import CPU_PERIOD_US, cpu_quota_us

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(RuntimeError):
    pass


@dataclass(frozen=True)
class CpuHierarchy:
    root: Path  # where groups are made
    version: int  # 1 or 2

    @classmethod
    def detect(cls, mount: Path = CGROUP_ROOT) -> CpuHierarchy:
        controllers = mount / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return cls(mount, 2)
        if (mount / "cpu" / "cpu.cfs_quota_us").exists():
            return cls(mount / "cpu", 1)
        raise CgroupError(f"no cgroup cpu controller under {mount} (neither v2's cpu.max nor v1's cpu.cfs_quota_us)")

    def group(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def make(self, parent: str, name: str, cpus: float) -> Path:
        """The group `parent/name` limited to `cpus` CPUs (created as needed)."""
        top = self.group(parent)
        top.mkdir(exist_ok=True)
        if self.version == 2:
            (top / "cgroup.subtree_control").write_text("+cpu")
        group = top / name
        group.mkdir(exist_ok=True)
        quota = cpu_quota_us(cpus)
        if self.version == 2:
            (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        return group

    def quota(self, group: Path) -> float:
        """The group's CPUs, read back from the kernel (the tests' proof of the quota)."""
        if self.version == 2:
            quota, period = (group / "cpu.max").read_text().split()
            return float("inf") if quota == "max" else int(quota) / int(period)
        quota_us = int((group / "cpu.cfs_quota_us").read_text())
        return float("inf") if quota_us < 0 else quota_us / int((group / "cpu.cfs_period_us").read_text())


def procs(group: Path) -> list[int]:
    """Every process in `group` and the groups below it."""
    found: list[int] = []
    for tasks in sorted(group.rglob("cgroup.procs")) if group.exists() else ():
        try:
            found += [int(line) for line in tasks.read_text().split()]
        except OSError:
            continue  # removed meanwhile
    return found


def kill_and_remove(group: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in `group` (and below), then remove the groups, deepest first."""
    deadline = time.monotonic() + timeout
    while (pids := procs(group)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if procs(group):
        raise CgroupError(f"{group}: processes survive SIGKILL: {procs(group)}")
    if not group.exists():
        return
    for child in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir(child, deadline)
    _rmdir(group, deadline)


def _rmdir(path: Path, deadline: float) -> None:
    while True:  # a killed process leaves its group a moment after it is reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise CgroupError(f"cannot remove {path}: {error}") from None
            time.sleep(0.05)
