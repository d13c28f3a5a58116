"""The pure half of benchmarks/recovery.py: parsing the agents' and VMs' logs and computing the
recovery figures from the ledger's metrics rows (one row per agent status per controller tick).

Nothing here runs a cluster, so tests/test_recovery_figures.py checks it on made-up rows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]  # a ledger metrics row: t, instance_id, state, epoch, samples, samples_per_second

# agents/roles/data_parallel.py: "checkpoint epoch 4: snapshot took 0.012s of training (the stall) ..."
STALL = re.compile(r"checkpoint epoch (\d+): snapshot took ([0-9.]+)s of training \(the stall\)"
                   r"(?:, ([0-9.]+)s of it waiting for (?:the delayed update|state averaging))?")
RESUMED = re.compile(r"resumed from checkpoint epoch (\d+) of (\S+)")
# providers/local_vm.py, in the VM's supervisor.log: "12:34:56 vm i-abc: agent started (pid 42)"
AGENT_STARTED = re.compile(r"^(\d\d):(\d\d):(\d\d) vm \S+: agent started \(pid \d+\)", re.MULTILINE)
# the agent's start, stamped "N.Ns after the agent started" (agents/startup.py): milestone -> pattern
STARTUP = {
    "imports_done": re.compile(r"agent: imports done ([0-9.]+)s after the agent started"),
    "joined_swarm": re.compile(r"agent: joined the swarm as .*\(([0-9.]+)s after the agent started\)"),
    "optimizer_built": re.compile(r"agent: optimizer built ([0-9.]+)s after the agent started"),
    "resumed_from_store": re.compile(r"agent: resumed from checkpoint epoch \d+ of \S+ \(([0-9.]+)s after"),
    "first_step_done": re.compile(r"agent: first step done at epoch \d+ ([0-9.]+)s after the agent started"),
    # its samples first counted toward the swarm's epoch: the step reported them to the swarm (in sync)
    "contributing": re.compile(r"agent: contributing: first samples counted .*, ([0-9.]+)s after the agent started"),
    "first_epoch_stepped": re.compile(r"agent: first epoch stepped with the swarm: .*, ([0-9.]+)s after the agent"),
}
# kernels/paced_progress.py: "state from a peer: epoch 12 -> 17 in 26.3s (the swarm's records say epoch 16)"
STATE_DOWNLOAD = re.compile(r"state from a peer: epoch (\d+) -> (\d+) in ([0-9.]+)s")
CONTRIBUTION_LAG_EPOCHS = 1  # with delayed updates an in-sync agent's local epoch may trail the swarm's by one


def global_epochs(rows: Iterable[Row]) -> list[tuple[float, int]]:
    """(tick time, the swarm's epoch: the highest a training agent reported) per tick, in time order."""
    by_tick: dict[float, int] = {}
    for row in rows:
        if row["state"] == "training":
            by_tick[row["t"]] = max(by_tick.get(row["t"], 0), int(row["epoch"]))
    return sorted(by_tick.items())


def epoch_at(series: Sequence[tuple[float, int]], t: float) -> int | None:
    """The swarm's epoch at the last tick at or before `t`."""
    before = [epoch for tick, epoch in series if tick <= t]
    return before[-1] if before else None


def seconds_per_epoch(series: Sequence[tuple[float, int]], start: float, end: float) -> float | None:
    """Mean wall seconds per global epoch between the first and last tick in [start, end]."""
    window = [(t, e) for t, e in series if start <= t <= end]
    if len(window) < 2 or window[-1][1] <= window[0][1]:
        return None
    return (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1])


def first_contribution(rows: Iterable[Row], instance_id: str) -> float | None:
    """When `instance_id` first contributed to an epoch: the first tick at which it trains with
    samples counted (its local steps report progress to the swarm's epoch) and its epoch is the
    swarm's (within CONTRIBUTION_LAG_EPOCHS; an agent still loading state reports an older one)."""
    rows = list(rows)
    series = dict(global_epochs(rows))
    for row in rows:
        if row["instance_id"] != instance_id or row["state"] != "training" or int(row["samples"]) <= 0:
            continue
        if int(row["epoch"]) >= series.get(row["t"], 0) - CONTRIBUTION_LAG_EPOCHS:
            return float(row["t"])
    return None


def agent_started_at(supervisor_log: str, launched_at: float) -> float | None:
    """The wall time of the VM's first "agent started" line. The line has the local time of day
    only; the date is the VM's launch's (the day after, if that time is earlier than the launch)."""
    match = AGENT_STARTED.search(supervisor_log)
    if match is None:
        return None
    day = time.localtime(launched_at)
    hours, minutes, seconds = (int(g) for g in match.groups())
    started = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, hours, minutes, seconds, 0, 0, -1))
    return started + 86400 if started < launched_at - 60 else started


def stalls(agent_log: str) -> list[tuple[float, float]]:
    """(seconds the training thread was blocked by a checkpoint, of which waiting for the delayed
    update) for every checkpoint the agent snapshotted."""
    return [(float(total), float(waited or 0.0)) for _, total, waited in STALL.findall(agent_log)]


def startup(agent_log: str) -> dict[str, Any]:
    """Where an agent's start went: each milestone's seconds after its process started (None if
    the log has none), and every state download from a peer as (from epoch, to epoch, seconds)."""
    found: dict[str, Any] = {}
    for name, pattern in STARTUP.items():
        match = pattern.search(agent_log)
        found[name] = float(match.group(1)) if match else None
    found["state_downloads"] = [(int(a), int(b), float(t)) for a, b, t in STATE_DOWNLOAD.findall(agent_log)]
    return found


def replacement_times(breakdown: Mapping[str, Any], started: float | None, seen_at: float,
                      noticed_at: float) -> dict[str, Any]:
    """Seconds from the replacement agent's start until it contributes: from its own stamped line
    (0.1 s; `breakdown` is `startup()`'s) when it has one, else as the controller saw it. The
    controller's figure (its first tick whose status record shows the agent training at the
    swarm's epoch with samples, against the supervisor's whole-second "agent started") also
    counts the status record's period and the tick's: up to a few seconds the agent did not wait."""
    seen = None if started is None else seen_at - started
    own = breakdown.get("contributing")
    return {"seconds_from_notice": seen_at - noticed_at,
            "seconds_from_agent_start": own if own is not None else seen,
            "measured_from": "agent log" if own is not None else "controller ticks",
            "seen_by_controller_seconds_from_agent_start": seen,
            "agent_start_from_notice": None if started is None else started - noticed_at}


def resumed_epochs(agent_log: str) -> list[int]:
    return [int(epoch) for epoch, _ in RESUMED.findall(agent_log)]


def mean_step_seconds(rows: Iterable[Row], batch_size: int) -> float | None:
    """A local step's mean wall time: the batch over the agents' mean samples/s while training."""
    rates = [float(r["samples_per_second"]) for r in rows if r["state"] == "training" and r["samples_per_second"] > 0]
    return batch_size * len(rates) / sum(rates) if rates else None


def noticed_preemption(series: Sequence[tuple[float, int]], noticed_at: float, until: float,
                       before_from: float) -> dict[str, Any]:
    """Whether a noticed preemption cost the swarm an epoch between the notice and `until`: the
    epoch never fell below the one at the notice, and it kept advancing; the seconds per epoch
    in the window against those from `before_from` to the notice."""
    at_notice = epoch_at(series, noticed_at)
    after = [e for t, e in series if noticed_at < t <= until]
    if at_notice is None or not after:
        return {"epoch_at_notice": at_notice, "epochs_lost": None, "never_fell": None, "advanced_by": None}
    window = [at_notice, *after]
    during, before = seconds_per_epoch(series, noticed_at, until), seconds_per_epoch(series, before_from, noticed_at)
    return {"epoch_at_notice": at_notice, "epochs_lost": max(0, at_notice - min(after)),
            "never_fell": all(b >= a for a, b in zip(window, window[1:])), "advanced_by": max(after) - at_notice,
            "seconds_per_epoch_before": before, "seconds_per_epoch_during": during,
            "slowdown": during / before if during and before else None}


def ratio(value: float | None, target: float | None) -> float | None:
    return None if value is None or not target else value / target


def figures(replacement: Mapping[str, Any], notice: Mapping[str, Any], fleet: Mapping[str, Any],
            stall: Mapping[str, Any]) -> dict[str, Any]:
    """The four figures, each against its named target, and whether each target was met."""
    epoch_s = notice.get("seconds_per_epoch_before")
    from_start = replacement.get("seconds_from_agent_start")
    lost, every = fleet.get("epochs_lost"), fleet.get("every_epochs")
    blocked = [total for total, _ in stall.get("stalls", [])]
    step = stall.get("mean_step_seconds")
    mean_stall = sum(blocked) / len(blocked) if blocked else None
    worst = max(blocked) if blocked else None
    waited = sum(w for _, w in stall["stalls"]) / len(blocked) if blocked else None
    return {
        "replacement": {**replacement, "seconds_per_epoch": epoch_s,
                        "epochs_from_agent_start": ratio(from_start, epoch_s), "target_epochs_from_agent_start": 1.0,
                        "met": _le(ratio(from_start, epoch_s), 1.0)},
        "noticed_preemption": {**notice, "target_epochs_lost": 0,
                               "met": None if notice.get("epochs_lost") is None else
                               notice["epochs_lost"] == 0 and bool(notice["never_fell"]) and notice["advanced_by"] > 0},
        "fleet_loss": {**fleet, "epochs_lost_vs_every_epochs": ratio(lost, every), "target_epochs_lost": every,
                       "met": None if lost is None or every is None else lost <= every},
        "checkpoint_stall": {"checkpoints": len(blocked), "mean_stall_seconds": mean_stall,
                             "max_stall_seconds": worst, "mean_step_seconds": step,
                             "mean_waiting_for_delayed_update_seconds": waited,
                             # the in-memory copy alone, what the writer itself costs the training thread
                             "snapshot_only_fraction_of_step":
                                 ratio(None if mean_stall is None or waited is None else mean_stall - waited, step),
                             "stall_fraction_of_step": ratio(mean_stall, step),
                             "max_stall_fraction_of_step": ratio(worst, step), "target_fraction_of_step": 1.0,
                             "met": _lt(ratio(worst, step), 1.0)},
    }


def _le(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def _lt(value: float | None, target: float) -> bool | None:
    return None if value is None else value < target
