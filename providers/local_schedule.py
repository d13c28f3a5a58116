"""Preemption schedules for local "VMs", replayed from a real spot trace.

A Bamboo trace lists when each node of a real spot cluster was added and removed. A local
location replays it: an instance launched at trace time t takes the lifetime of the next
unclaimed trace node added at or after t, scaled by the time-compression factor. Nodes the
trace never removed give instances that are never preempted.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class TraceNode:
    added_s: float
    lifetime_s: float | None  # None: the trace never removed it


@cache
def trace_nodes(trace: str) -> tuple[tuple[TraceNode, ...], float]:
    """The trace's nodes sorted by add time, and the trace's horizon in seconds."""
    path = resources.files("spotrain") / "data" / "traces" / f"{trace}.csv"
    added: dict[str, float] = {}
    nodes: list[TraceNode] = []
    horizon = 0.0
    with path.open() as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if len(row) != 3 or row[1] not in ("add", "remove"):
                raise ValueError(f"{trace}.csv line {line}: expected t_ms,add|remove,node")
            t, event, node = float(row[0]) / 1000.0, row[1], row[2]
            horizon = max(horizon, t)
            if event == "add":
                added[node] = t
            elif node in added:
                start = added.pop(node)
                nodes.append(TraceNode(start, t - start))
    nodes.extend(TraceNode(start, None) for start in added.values())
    nodes.sort(key=lambda n: n.added_s)
    return tuple(nodes), horizon


@dataclass(frozen=True)
class Claim:
    lifetime_wall_s: float | None  # wall seconds until preemption; None = never
    announced: bool  # False: the VM dies without a notice
    trace_node: int


@contextmanager
def _locked_state(path: Path) -> Iterator[dict]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text()) if path.exists() else {}
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def claim_lifetime(
    state_path: Path,
    location: str,
    trace: str,
    now: float,
    time_compression: float,
    offset_s: float,
    unannounced_every: int,
) -> Claim:
    """Assign the next trace node to a new instance in `location`; persistent across processes."""
    nodes, horizon = trace_nodes(trace)
    with _locked_state(state_path) as state:
        epoch = state.setdefault("epoch", now)
        trace_time = ((now - epoch) * time_compression + offset_s) % max(horizon, 1.0)
        cursors = state.setdefault("cursors", {})
        starts = [n.added_s for n in nodes]
        index = max(bisect_left(starts, trace_time), cursors.get(location, -1) + 1)
        if index >= len(nodes):
            index = 0
        cursors[location] = index
        node = nodes[index]
        lifetime = None if node.lifetime_s is None else node.lifetime_s / time_compression
        announced = True
        if lifetime is not None:
            state["preemptions"] = state.get("preemptions", 0) + 1
            announced = not (unannounced_every and state["preemptions"] % unannounced_every == 0)
    return Claim(lifetime_wall_s=lifetime, announced=announced, trace_node=index)
