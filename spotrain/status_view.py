"""`spotrain status`: the figures a running cluster is watched by (elapsed and remaining time, burn
rate, when the budget runs out at that rate, checkpoint duty), their rendering, `--watch`, and
the list of clusters (`spotrain status` without a name)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from spotrain.contracts.states import AgentState, InstanceState
from spotrain.egress import EGRESS_WINDOW_SECONDS
from spotrain.ledger import Ledger, Run
from spotrain.report import egress_table
from spotrain.report_data import format_duration
from spotrain.status_fleet import Column, FittedTable, location_lines, worker_columns, workers_of

WATCH_SECONDS = 2.0


def live_figures(ledger: Ledger, run: Run, report: dict, workers: list[dict],
                 now: float | None = None, driven: bool = True) -> dict:
    """What `status` adds to the report's figures: time left, burn rate, the budget's horizon, duty.
    Without a controller (`driven` False) nothing ends the run or guards its budget: no countdown."""
    now = now or time.time()
    running = run.ended_at is None
    end_at = ledger.meta(f"run-{run.id}-end-at")  # set by `launch --duration`
    remaining = max(0.0, float(end_at) - now) if running and driven and isinstance(end_at, (int, float)) else None
    burn = sum(w["price_usd_per_hour"] for w in workers if w["state"] == InstanceState.RUNNING) if running else 0.0
    egress_burn = ledger.egress_usd_per_hour(run.id, now, EGRESS_WINDOW_SECONDS, WATCH_SECONDS) if running else 0.0
    burn += egress_burn
    left = max(0.0, run.budget_usd - report["spent_usd"])
    duty = [e["detail"] for e in ledger.events(run.id, kinds=("duty",))]
    return {
        "elapsed_seconds": report["duration_seconds"],
        "remaining_seconds": remaining,
        "burn_usd_per_hour": burn,  # instances and egress
        "egress_usd_per_hour": egress_burn,
        "egress_usd": report["egress_usd"],
        "egress_by_path": report["egress_by_path"],
        "budget_runs_out_in_seconds": left / burn * 3600.0 if burn and driven else None,
        "duty": duty[-1].split(",") if duty and duty[-1] else [],
        "checkpoint_path": report["checkpoint_path"],
        "samples_per_second": sum(w["samples_per_second"] or 0.0 for w in workers
                                  if w["state"] == InstanceState.RUNNING and w["agent_state"] == AgentState.TRAINING),
        "end_reason": report["end_reason"],
    }


def render(data: dict) -> Group:
    """One cluster's status; once its run ended, how it ended and where the report is."""
    pid = data["controller_pid"]
    controller = f"controller pid {pid}" if pid else "no controller"
    head = (f"{data['cluster']} run {data['run']} ({data['state']}, {controller})   "
            f"elapsed {format_duration(data['elapsed_seconds'])}")
    if data["remaining_seconds"] is not None:
        head += f"   ends in {format_duration(data['remaining_seconds'])}"
    share = min(1.0, data["spent_usd"] / data["budget_usd"]) if data["budget_usd"] else 0.0
    bar = "#" * round(30 * share) + "." * (30 - round(30 * share))
    money = f"budget [{bar}] ${data['spent_usd']:.4f} of ${data['budget_usd']:.2f}"
    if data["state"] == "ended":
        return Group(Text(head, style="bold"), Text(money),
                     Text(f"ended: {data['end_reason'] or '-'}; see `spotrain report {data['cluster']}`"))
    horizon = data["budget_runs_out_in_seconds"]
    money += f"   burn ${data['burn_usd_per_hour']:.3f}/h" + (
        f" (egress ${data['egress_usd_per_hour']:.3f}/h)" if data.get("egress_usd_per_hour") else "") + (
        f", the budget lasts {format_duration(horizon)} at this rate" if horizon is not None else "")
    checkpoint = data["checkpoint_path"] or "none yet"
    progress = (f"epoch {data['epoch']}   samples {data['samples']:,}   "
                f"{data['samples_per_second']:.1f} samples/s   newest checkpoint {checkpoint}")
    holders = [f"{w['instance_id']} ({w['location']})" for w in data["workers"] if w["instance_id"] in data["duty"]]
    parts: list[RenderableType] = [Text(head, style="bold"), Text(money)]
    if not pid:
        parts.append(Text(orphaned(data), style="bold red"))
    parts += [Text(progress), Text(f"checkpoints written by {', '.join(holders) or 'nobody yet'}"),
              *(Text(line) for line in location_lines(data["workers"]))]
    if data["workers"]:
        parts.append(FittedTable(worker_columns(data["duty"]), data["workers"]))
    if data.get("egress_by_path"):
        parts.append(egress_table(data["egress_by_path"]))
    return Group(*parts)


def orphaned(data: dict) -> str:
    """A run whose controller is gone (killed, its machine down): nothing ends it or guards its budget."""
    live = sum(1 for w in data["workers"] if w["state"] == InstanceState.RUNNING)
    return (f"no controller drives this run: nothing ends it or guards its budget, and the {live} VM(s) "
            f"the ledger last saw running may still be billed. `spotrain down {data['cluster']}` stops them; "
            f"`spotrain launch SPEC` resumes the run (its --duration end and budget carry over).")


def watch(fetch: Callable[[], Any], draw: Callable[[Any], RenderableType], done: Callable[[Any], bool],
          console: Console, every: float = WATCH_SECONDS) -> None:
    """Redraw what `fetch` returns every `every` seconds until `done` says so (then once more) or Ctrl-C."""
    data = fetch()
    with Live(draw(data), console=console, auto_refresh=False) as live:
        while not done(data):
            time.sleep(every)
            data = fetch()
            live.update(draw(data), refresh=True)
    if not console.is_terminal:
        console.line()  # off a terminal, Live ends without a newline


def cluster_rows() -> list[dict]:
    """Every cluster's latest run, for `spotrain status` without a name."""
    from spotrain.controller_process import controller_pid
    from spotrain.home import cluster_names, ledger_path
    from spotrain.ledger_file import opened_ledger

    rows = []
    for name in cluster_names():
        with opened_ledger(ledger_path(name)) as ledger:
            run = ledger.current_run()
            spent = ledger.spent(run.id) if run else 0.0
            workers = workers_of(ledger, run) if run and run.ended_at is None else []
        rows.append({"cluster": name, "run": run.id if run else None,
                     "state": "no run" if run is None else "ended" if run.ended_at is not None else "running",
                     "spent_usd": spent, "budget_usd": run.budget_usd if run else None,
                     "end_reason": run.end_reason if run else None, "controller_pid": controller_pid(name),
                     "workers": len(workers),
                     "training": sum(1 for w in workers if w["agent_state"] == AgentState.TRAINING)})
    return rows


def clusters_done(rows: list[dict]) -> bool:
    """`status --watch` without a name stops once no cluster's run goes on."""
    return all(row["state"] != "running" for row in rows)


def clusters_table(rows: list[dict]) -> RenderableType:
    if not rows:
        return Text("no clusters yet: `spotrain launch SPEC` starts one")
    return FittedTable(CLUSTER_COLUMNS, rows, title="clusters (`spotrain status NAME` for one)")


def _cluster_state(row: dict) -> str:
    if row["state"] == "running" and not row["controller_pid"]:
        return "running, no controller"
    return row["state"] + (f": {row['end_reason']}" if row["end_reason"] else "")


CLUSTER_COLUMNS = [
    Column("cluster", lambda r: r["cluster"], 10),
    Column("state", _cluster_state, 9),
    Column("spent / budget", lambda r: "-" if r["budget_usd"] is None
           else f"${r['spent_usd']:.4f} / ${r['budget_usd']:.2f}", 8),
    Column("workers", lambda r: f"{r['workers']} ({r['training']} training)" if r["state"] == "running" else "-", 7),
    Column("run", lambda r: str(r["run"] or "-"), 3),
    Column("controller", lambda r: f"pid {r['controller_pid']}" if r["controller_pid"] else "-", 2),
]
