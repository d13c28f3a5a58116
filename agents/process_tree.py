"""End every process this agent started before it exits.

hivemind forks the DHT's process (which starts p2pd) and one process per averager. An agent that
leaves with `os._exit` (the drain window ending mid-step) would leave them running: a peer that
still answers the swarm for a VM about to vanish, and on the local provider processes that outlive
their VM. The whole tree is listed before any signal: a killed DHT process's p2pd is re-parented
and a later walk from this process would no longer find it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POLL_SECONDS = 0.05


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`, parents before their children."""
    found, frontier = [], children_of(pid)
    while frontier:
        found += frontier
        frontier = [child for parent in frontier for child in children_of(parent)]
    return found


def _identity(pid: int) -> str | None:
    """The process's start time (a recycled pid has another), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _signal_all(processes: dict[int, str | None], signum: int) -> None:
    for pid, identity in processes.items():
        if identity is not None and _identity(pid) == identity:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _wait_gone(processes: dict[int, str | None], seconds: float) -> dict[int, str | None]:
    """Those of `processes` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        alive: dict[int, str | None] = {pid: identity for pid, identity in processes.items()
                                         if identity is not None and _identity(pid) == identity}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(POLL_SECONDS)


def end_descendants(grace_seconds: float = 0.5) -> int:
    """SIGTERM every descendant of this process, SIGKILL those left after the grace; returns how many there were."""
    tree = {pid: _identity(pid) for pid in descendants(os.getpid())}
    _signal_all(tree, signal.SIGTERM)
    left = _wait_gone(tree, grace_seconds)
    left.update({pid: _identity(pid) for pid in descendants(os.getpid())})  # any started meanwhile
    _signal_all(left, signal.SIGKILL)
    _wait_gone(left, grace_seconds)
    return len(tree)
