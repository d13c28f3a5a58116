"""Cost and throughput reports of a run, from the ledger alone."""

from __future__ import annotations

import json
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from spotrain.contracts.states import AgentState, EndReason, InstanceState, LaunchReason
from spotrain.ledger import Ledger, Run
from spotrain.report_data import format_duration, format_usd, headline, planned_against_actual


def build_report(ledger: Ledger, run: Run, cluster: str) -> dict:
    metrics = ledger.metrics(run.id)
    traffic: dict[str, tuple[int, int]] = {}
    losses_by_time: dict[float, list[float]] = defaultdict(list)
    for m in metrics:
        traffic[m["instance_id"]] = (m["bytes_sent"], m["bytes_received"])
        if m["loss"] is not None and m["state"] == AgentState.TRAINING:
            losses_by_time[m["t"]].append(m["loss"])
    loss_times = sorted(losses_by_time)
    instances = ledger.instances(run_id=run.id)
    preempted = [i for i in instances if i.state == InstanceState.PREEMPTED]
    launched = [i for i in instances if i.state != InstanceState.FAILED]
    return {
        "cluster": cluster,
        "run": run.id,
        "state": "ended" if run.ended_at is not None else "running",
        "end_reason": run.end_reason,
        "budget_usd": run.budget_usd,
        "epochs": max((m["epoch"] for m in metrics), default=0),
        "workers_launched": len(launched),
        "preemptions": len(preempted),
        "preemptions_without_notice": len([i for i in preempted
                                           if i.end_reason == EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE]),
        "replacements": len([i for i in launched if i.reason == LaunchReason.REPLACEMENT]),
        "stage_peer_launches": len([i for i in launched if i.reason == LaunchReason.STAGE_PEERS]),  # swarm mode
        "loss_first": _mean(losses_by_time[loss_times[0]]) if loss_times else None,
        "loss_last": _mean(losses_by_time[loss_times[-1]]) if loss_times else None,
        "spend_by_location": ledger.spend_by_location(run.id),
        "egress_usd": ledger.egress_spent(run.id),  # part of spent_usd
        "egress_by_path": ledger.egress_by_path(run.id),
        "traffic_by_worker": [{"instance_id": k, "bytes_sent": v[0], "bytes_received": v[1]}
                              for k, v in sorted(traffic.items())],
        "compression": _compression(run.spec),
        "stages": _stages(ledger, run),
        **headline(ledger, run, cluster),  # spend, samples, samples/s planned and reached, ...
    }


def _stages(ledger: Ledger, run: Run) -> list[dict]:
    """Swarm mode: the stages as the controller last saw them served ([] for data parallelism)."""
    seen = ledger.events(run.id, kinds=("stages",))
    return json.loads(seen[-1]["detail"]) if seen else []


def _compression(spec: dict) -> dict:
    """Each codec of the run with its nominal ratio (fp32 bytes per wire byte; None: model-dependent)."""
    from spotrain.kernels.table import nominal_ratio

    chosen = spec.get("training", {}).get("compression", {})
    swarm = spec.get("training", {}).get("mode") == "swarm"
    result = {}
    for kind in ("gradients", "state", "activations") if swarm else ("gradients", "state"):
        name = chosen.get(kind, "none")
        try:
            ratio = nominal_ratio(name)
        except ValueError:  # a spec from a version that knew other codecs
            ratio = None
        result[kind] = {"codec": name, "nominal_ratio": ratio}
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    summary = Table(title=f"spotrain report: {report['cluster']} (run {report['run']}, {report['state']})",
                    show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right", overflow="fold")
    rows = [
        ("duration", format_duration(report["duration_seconds"])),
        ("spent / budget", f"${report['spent_usd']:.4f} / ${report['budget_usd']:.2f}"),
        ("of which egress", f"${report.get('egress_usd', 0.0):.4f}"),
        ("on demand it would cost (saved)", _on_demand(report)),
        ("samples", f"{report['samples']:,}"),
        ("global epoch", str(report["epochs"])),
        *planned_against_actual(report),
        ("loss first -> last", f"{_fmt(report['loss_first'], '{:.3f}')} -> {_fmt(report['loss_last'], '{:.3f}')}"),
        ("workers launched", str(report["workers_launched"])),
        ("preemptions (without notice)", f"{report['preemptions']} ({report['preemptions_without_notice']})"),
        ("replacements", str(report["replacements"])),
        *[(f"{kind} codec (x fewer bytes)", _codec(report["compression"][kind]))
          for kind in ("gradients", "state", "activations") if kind in report.get("compression", {})],
        *[(f"stage {stage['stage']}", f"{stage['peers']} peers, {stage['samples_per_second']:.1f} samples/s"
           + (f" in {', '.join(stage['domains'])}" if stage.get("domains") else ""))
          for stage in report.get("stages", ())],
        ("newest checkpoint", report["checkpoint_path"] or f"none yet (in {report['checkpoint_dir']})"),
        ("end", report["end_reason"] or "-"),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)
    by_location = Table(title="spend by location")
    for column in ("location", "instance-hours", "usd", "samples", "$/1M samples", "on demand $/1M"):
        by_location.add_column(column, justify="left" if column == "location" else "right")
    for row in report["locations"]:
        by_location.add_row(row["location"], f"{row['seconds'] / 3600:.4f}", f"${row['usd']:.4f}",
                            f"{row['samples']:,}", format_usd(row["cost_per_million_samples_usd"]),
                            format_usd(row["on_demand_cost_per_million_samples_usd"]))
    console.print(by_location)
    if report.get("egress_by_path"):
        console.print(egress_table(report["egress_by_path"]))
    traffic = Table(title="tensor traffic by worker")
    for column in ("worker", "MB sent", "MB received"):
        traffic.add_column(column, justify="left" if column == "worker" else "right")
    for row in report["traffic_by_worker"]:
        traffic.add_row(row["instance_id"], f"{row['bytes_sent'] / 1e6:.2f}", f"{row['bytes_received'] / 1e6:.2f}")
    console.print(traffic)


def egress_table(paths: list[dict]) -> Table:
    """Egress dollars by path (source -> destination location), as charged."""
    table = Table(title="egress by path")
    for column in ("from", "to", "GB", "usd"):
        table.add_column(column, justify="left" if column in ("from", "to") else "right")
    for path in paths:
        table.add_row(path["source"], path["destination"], f"{path['gb']:.3f}", f"${path['usd']:.4f}")
    return table


def _on_demand(report: dict) -> str:
    if report["on_demand_usd"] is None:
        return "- (not in the catalog)"
    return f"${report['on_demand_usd']:.4f} ({report['savings_fraction']:.0%})"


def _codec(entry: dict) -> str:
    ratio = entry["nominal_ratio"]
    return f"{entry['codec']} ({'model-dependent' if ratio is None else f'{ratio:.2f}x'})"
