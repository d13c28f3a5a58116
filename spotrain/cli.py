"""The `spotrain` command: thin; parses, loads the spec, calls the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from spotrain.errors import SpotrainError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)


def fail(message: str) -> None:
    """One line on stderr, exit 2: the contract for bad input (one line per problem when there are several)."""
    for line in message.splitlines():
        print(f"spotrain: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


def check_number(flag: str, value: float | None, most: float, least: float | None = None) -> None:
    """A number on the command line must be finite and in range (above 0, or from `least`), or we stop here."""
    if value is None:
        return
    if least is None and not 0 < value <= most:  # both comparisons are False for NaN
        raise SpotrainError(f"{flag}: must be a number greater than 0 and at most {most:g} (got {value})")
    if least is not None and not least <= value <= most:
        raise SpotrainError(f"{flag}: must be a number from {least:g} to {most:g} (got {value})")


def say(message: str) -> None:
    console.print(f"[dim]{__import__('time').strftime('%H:%M:%S')}[/dim] {message}", highlight=False)


@app.callback()
def _root() -> None:
    """Train one model on spot VMs within a hard budget."""


@app.command()
def launch(
    config: Path = typer.Argument(..., help="cluster spec (YAML)"),
    budget: float | None = typer.Option(None, "--budget", help="total USD for this run; overrides budget.total_usd"),
    duration: float | None = typer.Option(None, "--duration", help="end the run after this many seconds"),
    target_epoch: int | None = typer.Option(None, "--target-epoch", help="end the run at this global epoch"),
    tick: float = typer.Option(2.0, "--tick", help="seconds between controller ticks"),
    detach: bool = typer.Option(False, "--detach", help="run the controller in the background"),
    report: bool = typer.Option(True, "--report/--no-report", help="print the report when the run ends"),
) -> None:
    """Bid, launch, train, replace preempted workers, stop before the budget runs out."""
    from spotrain.config import MAX_HOURS, load_spec
    from spotrain.providers.base import ProviderError

    try:
        check_number("--duration", duration, MAX_HOURS * 3600.0)
        check_number("--tick", tick, 3600.0, least=0.1)
        check_number("--target-epoch", target_epoch, 10**9)
        spec = load_spec(config)
        if budget is not None:
            spec = spec.with_budget(budget)
        from spotrain import cluster_ops
        from spotrain.controller_process import controller_pid, launch_detached

        if detach:
            cluster_ops.checked_provider(spec)  # a missing credential fails here, not in the background
            pid = controller_pid(spec.name)
            if pid:
                raise SpotrainError(f"a controller (pid {pid}) already drives cluster {spec.name!r}")
            args = ["--tick", str(tick)]
            for flag, value in (("--budget", budget), ("--duration", duration), ("--target-epoch", target_epoch)):
                args += [flag, str(value)] if value is not None else []
            pid = launch_detached(config.resolve(), args, spec.name)  # returns once it holds the cluster
            console.print(f"controller of {spec.name} started in the background (pid {pid}); "
                          f"follow with `spotrain status {spec.name}`")
            return
        reason = cluster_ops.launch(spec, duration=duration, target_epoch=target_epoch, tick_seconds=tick, say=say)
    except (SpotrainError, ProviderError) as error:  # a cloud refusing at start: one line, not a traceback
        fail(str(error))
        return
    say(f"run ended: {reason}")
    if report:
        _print_report(spec.name, as_json=False)


@app.command()
def status(cluster: str | None = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """Workers, locations, budget, throughput of a cluster."""
    from rich.table import Table

    from spotrain import cluster_ops

    try:
        data = cluster_ops.status(cluster)
    except SpotrainError as error:
        fail(str(error))
        return
    if as_json:
        print(json.dumps(data))
        return
    share = min(1.0, data["spent_usd"] / data["budget_usd"]) if data["budget_usd"] else 0.0
    bar = "#" * round(30 * share) + "." * (30 - round(30 * share))
    controller = f"controller pid {data['controller_pid']}" if data["controller_pid"] else "no controller running"
    console.print(f"[bold]{data['cluster']}[/bold] run {data['run']} ({data['state']}, {controller})")
    console.print(f"budget [{bar}] ${data['spent_usd']:.4f} of ${data['budget_usd']:.2f}   "
                  f"epoch {data['epoch']}   samples {data['samples']:,}", markup=False)
    table = Table()
    for column in ("instance", "location", "state", "agent", "epoch", "samples/s", "loss", "$/h"):
        table.add_column(column)
    for w in data["workers"]:
        table.add_row(w["instance_id"] or "-", w["location"], w["state"], w["agent_state"] or "-",
                      str(w["epoch"] if w["epoch"] is not None else "-"),
                      f"{w['samples_per_second']:.1f}" if w["samples_per_second"] is not None else "-",
                      f"{w['loss']:.3f}" if w["loss"] is not None else "-", f"{w['price_usd_per_hour']:.3f}")
    console.print(table)


@app.command()
def down(cluster: str | None = typer.Argument(None)) -> None:
    """Final checkpoint, then terminate every worker of the cluster."""
    from spotrain import cluster_ops

    try:
        name = cluster_ops.down(cluster, say=say)
    except SpotrainError as error:
        fail(str(error))
        return
    say(f"{name}: every worker terminated")


def _print_report(cluster: str | None, as_json: bool) -> None:
    from spotrain.home import existing_cluster, ledger_path
    from spotrain.ledger_file import opened_ledger
    from spotrain.report import build_report, print_report

    name = existing_cluster(cluster)
    with opened_ledger(ledger_path(name)) as ledger:
        run = ledger.current_run()
        if run is None:
            raise SpotrainError(f"cluster {name!r} has no run")
        data = build_report(ledger, run, name)
    if as_json:
        print(json.dumps(data))
    else:
        print_report(data, console)


@app.command()
def report(cluster: str | None = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """Cost and throughput of the cluster's latest run."""
    try:
        _print_report(cluster, as_json)
    except SpotrainError as error:
        fail(str(error))


@app.command()
def prices(gpu: str | None = typer.Option(None, "--gpu"), provider: str | None = typer.Option(None, "--provider"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """The market as spotrain sees it: catalog offers, spot and on-demand."""
    from rich.table import Table

    from spotrain.market import catalog_offers

    offers = [o for o in catalog_offers("spot") if (gpu is None or (o.gpu or "").lower() == gpu.lower())
              and (provider is None or o.provider == provider)]
    if not offers:
        fail(f"no offers for --gpu {gpu} --provider {provider}")
    if as_json:
        print(json.dumps([{"location": o.location, "instance_type": o.instance_type, "gpu": o.gpu,
                           "gpu_count": o.gpu_count, "spot_usd_per_hour": o.spot_usd_per_hour,
                           "on_demand_usd_per_hour": o.on_demand_usd_per_hour, "source": "catalog"}
                          for o in offers]))
        return
    table = Table(title="spot offers (catalog prices; live prices replace them when a provider is enabled)")
    for column in ("location", "instance type", "gpu", "spot $/h", "on-demand $/h"):
        table.add_column(column)
    for o in sorted(offers, key=lambda o: (o.spot_usd_per_hour, o.location)):
        table.add_row(o.location, o.instance_type, f"{o.gpu_count}x {o.gpu}" if o.gpu else "cpu",
                      f"{o.spot_usd_per_hour:.3f}", f"{o.on_demand_usd_per_hour:.3f}")
    console.print(table)


@app.command()
def plan(config: Path = typer.Argument(..., help="cluster spec (YAML)"),
         as_json: bool = typer.Option(False, "--json"), tick: float = typer.Option(2.0, "--tick")) -> None:
    """Dry run: offers, placement, $/h, samples/s, $/1M samples, hours the budget pays for."""
    from spotrain import plan as planning
    from spotrain.config import load_spec
    from spotrain.provider_factory import make_provider

    try:
        check_number("--tick", tick, 3600.0, least=0.1)
        spec = load_spec(config)
        offers = planning.offers_for(spec, make_provider(spec).offers())
        planning.check_budget_covers_a_tick(spec, offers, tick)
        data = planning.plan(spec, offers)
    except SpotrainError as error:
        fail(str(error))
        return
    if as_json:
        print(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=f"plan for {data['cluster']} ({data['policy']}, {data['offers']} offers)")
    for column in ("location", "instance type", "gpu", "market", "$/h"):
        table.add_column(column)
    for row in data["placement"]:
        table.add_row(row["location"], row["instance_type"], row["gpu"] or "cpu", row["market"],
                      f"{row['usd_per_hour']:.3f}")
    console.print(table)
    per_million = data["cost_per_million_samples_usd"]
    console.print(f"${data['usd_per_hour']:.3f}/h (egress ${data['egress_usd_per_hour']:.4f}/h)   "
                  f"{data['samples_per_second']:.0f} samples/s   "
                  f"{'-' if per_million is None else f'${per_million:.3f}'} per 1M samples   "
                  f"budget lasts {data['projected_hours_within_budget']:.1f} h")


@app.command()
def simulate(config: Path = typer.Argument(..., help="cluster spec (YAML)"),
             trace: list[Path] = typer.Option(..., "--trace", help="trace file or folder (one file per location)"),
             policy: list[str] = typer.Option(None, "--policy", help="policy to compare (repeatable); default: all"),
             tick: float = typer.Option(120.0, "--tick", help="simulated seconds between controller ticks"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Replay real spot traces: every policy on the same job, with the real controller code."""
    from spotrain import plan as planning
    from spotrain.config import load_spec
    from spotrain.planner import policy_names
    from spotrain.sim.engine import compare, default_job
    from spotrain.sim.traces import load_traces

    names = policy or ["spotrain", "eager-next-region", "uniform-progress", "on-demand", "oracle"]
    try:
        check_number("--tick", tick, 86_400.0, least=1.0)  # simulated seconds: a smaller tick only runs longer
        valid = set(policy_names()) | {"oracle"}
        for name in names:
            if name not in valid:
                raise SpotrainError(f"--policy: unknown policy {name!r}; valid: {', '.join(sorted(valid))}")
        spec = load_spec(config)
        traces = load_traces(trace)
        job = default_job(spec, traces)
        from spotrain.sim.market import SimClock, SimProvider

        planning.check_budget_covers_a_tick(spec, SimProvider(traces, SimClock()).offers(), tick)
        results = compare(spec, traces, names, job, tick, progress=lambda m: print(m, file=sys.stderr))
    except SpotrainError as error:
        fail(str(error))
        return
    if as_json:
        print(json.dumps({"job": {"target_samples": job.target_samples, "deadline_hours": job.deadline_hours,
                                  "workers": spec.placement.workers, "locations": [t.location for t in traces]},
                          "policies": results}))
        return
    from rich.table import Table

    table = Table(title=f"{spec.name}: {job.target_samples:,.0f} samples within {job.deadline_hours:g} h, "
                        f"{spec.placement.workers} worker(s), {len(traces)} location(s)")
    for column in ("policy", "finished", "on time", "hours", "spent $", "$/1M samples", "preemptions"):
        table.add_column(column)
    for r in results:
        table.add_row(r["policy"], "yes" if r["finished"] else "no", "no" if r["missed_deadline"] else "yes",
                      f"{r['hours']:.1f}", f"{r['spent_usd']:.2f}",
                      "-" if r["cost_per_million_samples_usd"] is None else f"{r['cost_per_million_samples_usd']:.3f}",
                      str(r["preemptions"]))
    console.print(table)


@app.command()
def agent(user_data: Path = typer.Option(..., "--user-data", help="the agent's user-data JSON")) -> None:
    """The worker daemon (started on each VM by cloud-init/systemd, or by the local provider)."""
    from spotrain.agents.daemon import main as agent_main

    raise typer.Exit(agent_main(user_data))


def main() -> None:
    app()
