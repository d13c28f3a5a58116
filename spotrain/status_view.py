"""`spotrain status`: the figures a running cluster is watched by (elapsed and remaining time, burn
rate, when the budget runs out at that rate, checkpoint duty), their rendering, `--watch`, and
the list of clusters."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from spotrain.contracts.states import AgentState, InstanceState
from spotrain.egress import EGRESS_WINDOW_SECONDS
from spotrain.ledger import Ledger, Run
from spotrain.report import egress_table
from spotrain.report_data import format_duration

WATCH_SECONDS = 2.0


def live_figures(ledger: Ledger, run: Run, report: dict, workers: list[dict],
                 now: float | None = None) -> dict:
    """What `status` adds to the report's figures: time left, burn rate, the budget's horizon, duty."""
    now = now or time.time()
    running = run.ended_at is None
    end_at = ledger.meta(f"run-{run.id}-end-at")  # set by `launch --duration`
    remaining = max(0.0, float(end_at) - now) if running and isinstance(end_at, (int, float)) else None
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
        "budget_runs_out_in_seconds": left / burn * 3600.0 if burn else None,
        "duty": duty[-1].split(",") if duty and duty[-1] else [],
        "checkpoint_path": report["checkpoint_path"],
        "samples_per_second": sum(w["samples_per_second"] or 0.0 for w in workers
                                  if w["state"] == InstanceState.RUNNING and w["agent_state"] == AgentState.TRAINING),
        "end_reason": report["end_reason"],
    }


def render(data: dict) -> Group:
    """One cluster's status; once its run ended, how it ended and where the report is."""
    pid = data["controller_pid"]
    controller = f"controller pid {pid}" if pid else "no controller running"
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
    parts: list[Text | Table] = [Text(head, style="bold"), Text(money), Text(progress), _workers_table(data)]
    if data.get("egress_by_path"):
        parts.append(egress_table(data["egress_by_path"]))
    return Group(*parts)


def _workers_table(data: dict) -> Table:
    table = Table()
    table.add_column("instance", min_width=18)
    # duty: the instance writes checkpoints
    for column in ("location", "state", "agent", "duty", "epoch", "samples/s", "loss", "$/h"):
        table.add_column(column)
    for w in sorted(data["workers"], key=lambda w: (w["location"], w["instance_id"] or "")):
        table.add_row(w["instance_id"] or "-", w["location"], w["state"], w["agent_state"] or "-",
                      "yes" if w["instance_id"] in data["duty"] else "-",
                      str(w["epoch"] if w["epoch"] is not None else "-"),
                      f"{w['samples_per_second']:.1f}" if w["samples_per_second"] is not None else "-",
                      f"{w['loss']:.3f}" if w["loss"] is not None else "-", f"{w['price_usd_per_hour']:.3f}")
    return table


def watch(fetch: Callable[[], dict], console: Console, every: float = WATCH_SECONDS) -> None:
    """Redraw the status every `every` seconds until the run ends (then once more) or Ctrl-C."""
    data = fetch()
    with Live(render(data), console=console, auto_refresh=False) as live:
        while data["state"] != "ended":
            time.sleep(every)
            data = fetch()
            live.update(render(data), refresh=True)
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
        rows.append({"cluster": name, "run": run.id if run else None,
                     "state": "no run" if run is None else "ended" if run.ended_at is not None else "running",
                     "spent_usd": spent, "budget_usd": run.budget_usd if run else None,
                     "end_reason": run.end_reason if run else None, "controller_pid": controller_pid(name)})
    return rows


def clusters_table(rows: list[dict]) -> Table:
    table = Table(title="clusters (`spotrain status NAME` for one)")
    for column in ("cluster", "run", "state", "spent / budget", "controller"):
        table.add_column(column)
    for row in rows:
        money = "-" if row["budget_usd"] is None else f"${row['spent_usd']:.4f} / ${row['budget_usd']:.2f}"
        state = row["state"] + (f": {row['end_reason']}" if row["end_reason"] else "")
        table.add_row(row["cluster"], str(row["run"] or "-"), state, money,
                      f"pid {row['controller_pid']}" if row["controller_pid"] else "-")
    return table
