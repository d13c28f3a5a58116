"""What an emulated local cloud left behind after `spotrain down`: its network namespaces and
cgroups, instances still running, and live processes of the spotrain home (VM supervisors,
agents, their hivemind children, p2pd). The demos' checks end with `down_and_report`: `down`, then
what it left; a clean `down` leaves none."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spotrain.contracts.states import InstanceState
from spotrain.providers.geo_network import namespaces
from spotrain.providers.local import LocalProvider

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROCESS_SETTLE_SECONDS = 30.0  # a VM's last processes may take a moment after `down` answered


def leftover_checks(provider: LocalProvider, name: str, home: Path) -> list[tuple[str, bool]]:
    """(what was checked, passed) for each kind of leftover of cluster `name`."""
    cloud = provider.cloud(name).plan.cloud
    left_namespaces = [n for n in namespaces() if n.startswith(cloud)]
    left_groups = [str(p) for p in CGROUP_ROOT.rglob(f"{cloud}*")]
    running = [i.instance_id for i in provider.list_instances(name) if i.state == InstanceState.RUNNING]
    left_processes = settled(lambda: processes_of(home), PROCESS_SETTLE_SECONDS)
    return [
        (f"no namespace left ({', '.join(left_namespaces) or 'none'})", not left_namespaces),
        (f"no cgroup left ({', '.join(left_groups) or 'none'})", not left_groups),
        (f"no instance running ({', '.join(running) or 'none'})", not running),
        (f"no process left ({'; '.join(left_processes) or 'none'})", not left_processes),
    ]


def down_and_report(checks: list[tuple[str, bool]], provider: LocalProvider, name: str, home: Path) -> int:
    """`spotrain down` cluster `name`, then print `checks` with the down's and the leftover checks
    after them ("ok" or "MISS" each); the demo check's exit code: 0 when every check passed."""
    down = subprocess.run([sys.executable, "-m", "spotrain", "down", name], capture_output=True, text=True,
                          check=False)
    checks = [*checks, ("`spotrain down` succeeded", down.returncode == 0), *leftover_checks(provider, name, home)]
    for text, ok in checks:
        print(f"{'ok  ' if ok else 'MISS'} {text}")
    if down.returncode != 0:
        print(down.stdout + down.stderr)
    return 0 if all(ok for _, ok in checks) else 1


def settled(read: Callable[[], list[str]], seconds: float) -> list[str]:
    """`read()` until it finds nothing or `seconds` passed; what it found last."""
    deadline = time.monotonic() + seconds
    found = read()
    while found and time.monotonic() < deadline:
        time.sleep(1.0)
        found = read()
    return list(found)


def processes_of(path: Path) -> list[str]:
    """Live processes that run in, name or carry `path` in their environment (VMs, agents, p2pd),
    other than this process and those above it (they carry SPOTRAIN_HOME too)."""
    found, mine = [], _ancestors()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
            cwd = os.readlink(proc / "cwd")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (str(path) in cmdline or str(path).encode() in environ or cwd.startswith(str(path))):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids
