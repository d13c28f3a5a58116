"""The `spotrain` command: thin; parses, loads the spec, calls the package."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from spotrain.errors import SpotrainError

if TYPE_CHECKING:
    pass

# add_completion: `--install-completion` / `--show-completion` for bash, zsh, fish and PowerShell
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)


def fail(message: str) -> None:
    """One line on stderr, exit 2: the contract for bad input (one line per problem when there are several)."""
    for line in message.splitlines():
        print(f"spotrain: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


# `launch` in the foreground: 0 for a run that ended as planned (budget, duration, target epoch, a
# drain), 1 for one its task ended (an agent that kept failing), 2 for bad input (`fail`)
RUN_FAILED_EXIT = 1  # a run that ended on something no retry fixes (cluster_ops.RunEnd.failed)


def check_number(flag: str, value: float | None, most: float, least: float | None = None) -> None:
    """A number on the command line must be finite and in range (above 0, or from `least`), or we stop here."""
    if value is None:
        return
    if least is None and not 0 < value <= most:  # both comparisons are False for NaN
        raise SpotrainError(f"{flag}: must be a number greater than 0 and at most {most:g} (got {value})")
    if least is not None and not least <= value <= most:
        raise SpotrainError(f"{flag}: must be a number from {least:g} to {most:g} (got {value})")


def say(message: str) -> None:
    """A line of the controller's log (spotrain.contracts.log_format: on stdout once `controller_logging` ran)."""
    logging.getLogger("spotrain.controller").info(message)


def controller_logging(route_hivemind: bool) -> None:
    """`launch` and `down` speak as the controller: their lines on stdout, in the one log format."""
    from spotrain.contracts.log_format import configure

    configure(sys.stdout, route_hivemind=route_hivemind)


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version

        print(f"spotrain {version('spotrain')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print spotrain's version and exit")) -> None:
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
    from spotrain.config import MAX_HOURS
    from spotrain.providers.base import ProviderError
    from spotrain.spec_file import load_spec

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
            args = ["--tick", str(tick), "--no-report"]  # its log holds log lines; `spotrain report` shows the report
            for flag, value in (("--budget", budget), ("--duration", duration), ("--target-epoch", target_epoch)):
                args += [flag, str(value)] if value is not None else []
            pid = launch_detached(config.resolve(), args, spec.name)  # returns once it holds the cluster
            console.print(f"controller of {spec.name} started in the background (pid {pid}); "
                          f"follow with `spotrain status {spec.name}` and `spotrain logs {spec.name} -f`")
            return
        from spotrain.geo import run_controller_behind_nat
        from spotrain.logs import log_to_file

        controller_logging(route_hivemind=True)
        run_controller_behind_nat(spec, say)  # the emulated cloud's controller: re-executed behind its NAT
        write_log_file = log_to_file(spec.name)
        end = cluster_ops.launch(spec, duration=duration, target_epoch=target_epoch, tick_seconds=tick, say=say,
                                    started=write_log_file)
    except (SpotrainError, ProviderError) as error:  # a cloud refusing at start: one line, not a traceback
        fail(str(error))
        return
    say(f"run ended: {end.reason}")
    if report:
        _print_report(spec.name, as_json=False)
    if end.failed:
        raise typer.Exit(RUN_FAILED_EXIT)


@app.command()
def status(cluster: str | None = typer.Argument(None, help="cluster name; without: the list of clusters"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout (a list without a name)"),
           watch: bool = typer.Option(False, "--watch", help="redraw every 2 s until the run ends or Ctrl-C"),
           ) -> None:
    """Workers by role and location, budget, burn rate, time left and throughput of a cluster; the
    list of clusters without a name."""
    from spotrain import cluster_ops, status_view

    try:
        if watch and as_json:
            raise SpotrainError("--watch and --json: choose one")
        if cluster is None:
            if watch:
                status_view.watch(status_view.cluster_rows, status_view.clusters_table, status_view.clusters_done,
                                  console)
                return
            rows = status_view.cluster_rows()
            print(json.dumps(rows)) if as_json else console.print(status_view.clusters_table(rows))
            return
        if watch:
            status_view.watch(lambda: cluster_ops.status(cluster), status_view.render,
                              lambda data: data["state"] == "ended", console)
            return
        data = cluster_ops.status(cluster)
    except SpotrainError as error:
        fail(str(error))
        return
    except KeyboardInterrupt:
        return
    if as_json:
        print(json.dumps(data))
        return
    console.print(status_view.render(data))


@app.command()
def down(cluster: str | None = typer.Argument(None, help="cluster name; may be left out when there is one")) -> None:
    """Final checkpoint, then terminate every worker of the cluster."""
    from spotrain import cluster_ops

    controller_logging(route_hivemind=False)
    try:
        name = cluster_ops.down(cluster, say=say)
    except SpotrainError as error:
        fail(str(error))
        return
    say(f"{name}: every worker terminated")


def _print_report(cluster: str | None, as_json: bool, run_number: int | None = None,
                  html_path: Path | None = None, csv_dir: Path | None = None) -> None:
    from spotrain.home import existing_cluster, ledger_path
    from spotrain.ledger_file import opened_ledger
    from spotrain.report import build_report, print_report
    from spotrain.report_data import select_run, series

    name = existing_cluster(cluster)
    written = []
    with opened_ledger(ledger_path(name)) as ledger:
        run = select_run(ledger, name, run_number)
        data = build_report(ledger, run, name)
        if csv_dir is not None:
            from spotrain.report_csv import write_csv

            written += write_csv(ledger, run, csv_dir)
        if html_path is not None:
            from spotrain.report_html import write_html

            write_html(data, series(ledger, run), html_path)
            written.append(html_path)
    if as_json:
        print(json.dumps(data))
    else:
        print_report(data, console)
    for path in written:  # on stderr: stdout stays one JSON object under --json
        print(f"wrote {path}", file=sys.stderr)


@app.command()
def report(cluster: str | None = typer.Argument(None, help="cluster name; may be left out when there is one"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout"),
           run_number: int | None = typer.Option(None, "--run", help="an older run (1 is the first)"),
           html_path: Path | None = typer.Option(None, "--html", help="also write a page with plots"),
           csv_dir: Path | None = typer.Option(None, "--csv", help="also write the run's ledger as CSV here"),
           ) -> None:
    """Cost and throughput of a run of the cluster (the latest by default)."""
    try:
        _print_report(cluster, as_json, run_number, html_path, csv_dir)
    except SpotrainError as error:
        fail(str(error))


@app.command()
def prices(gpu: str | None = typer.Option(None, "--gpu", help="only offers with this GPU, e.g. T4"),
           provider: str | None = typer.Option(None, "--provider", help="only this provider's offers: aws or gcp"),
           as_json: bool = typer.Option(False, "--json", help="one JSON list on stdout")) -> None:
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
         as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout"),
         tick: float = typer.Option(2.0, "--tick", help="seconds between controller ticks (the budget guard's lag)"),
         ) -> None:
    """Dry run: offers, placement, $/h, samples/s, $/1M samples, hours the budget pays for."""
    from spotrain import plan as planning
    from spotrain.provider_factory import make_provider
    from spotrain.providers.base import ProviderError
    from spotrain.spec_file import load_spec

    try:
        check_number("--tick", tick, 3600.0, least=0.1)
        spec = load_spec(config)
        notes = planning.check_plannable(spec)
        offers = planning.offers_for(spec, make_provider(spec), say=lambda line: print(line, file=sys.stderr))
        planning.check_budget_covers_a_tick(spec, offers, tick)
        data = planning.plan(spec, offers)
    except (SpotrainError, ProviderError) as error:  # e.g. no AWS credentials for live prices: one line
        fail(str(error))
        return
    for note in notes:
        print(f"spotrain: note: {note}", file=sys.stderr)
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
             as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout (bars stay on stderr)"),
             ) -> None:
    """Replay real spot traces: every policy on the same job, with the real controller code."""
    from spotrain import plan as planning
    from spotrain.policies import policy_names
    from spotrain.sim.engine import compare, default_job
    from spotrain.sim.traces import load_traces
    from spotrain.spec_file import load_spec

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
        from spotrain.sim.clock import SimClock
        from spotrain.sim.provider import SimProvider

        planning.check_budget_covers_a_tick(spec, SimProvider(traces, SimClock()).offers(), tick)
        from spotrain.progress_bars import StepBars

        with StepBars(len(names)) as bars:
            results = compare(spec, traces, names, job, tick, progress=bars)
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
def init(folder: Path = typer.Argument(Path("."), help="folder to write into (created when missing)"),
         name: str | None = typer.Option(None, "--name", help="cluster name (default: the folder's)"),
         ) -> None:
    """Write a task of your own (my_task.py: model, data, loss, optimizer) and a spec that trains it."""
    from spotrain.scaffold import write_skeleton

    try:
        written = write_skeleton(folder, name)
    except SpotrainError as error:
        fail(str(error))
        return
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    where = "" if folder.resolve() == Path.cwd() else f"cd {folder} && "
    console.print(f"next: {where}spotrain launch {written[-1].name} --duration 120", highlight=False)


@app.command()
def export(cluster: str = typer.Argument(..., help="cluster name"),
           out: Path = typer.Argument(..., help="file to write, e.g. model.pt")) -> None:
    """Write the newest checkpoint's model weights (a state_dict that torch.load(weights_only=True) reads)."""
    from spotrain.export import export_model

    try:
        exported = export_model(cluster, out)
    except SpotrainError as error:
        fail(str(error))
        return
    console.print(f"{exported.cluster}: model of epoch {exported.epoch} (from {exported.checkpoint_dir}) "
                  f"written to {exported.path}", highlight=False)


@app.command()
def logs(cluster: str | None = typer.Argument(None, help="cluster name; may be left out when there is one"),
         instance: str | None = typer.Argument(None, help="one instance's log only"),
         follow: bool = typer.Option(False, "-f", "--follow", help="keep printing what is added"),
         controller: bool = typer.Option(False, "--controller", help="the controller's log only"),
         lines: int = typer.Option(100, "-n", "--lines", help="last lines of each log; 0: all")) -> None:
    """The controller's log and each agent's (local VM files, EC2 console output, GCE serial port)."""
    from spotrain import logs as cluster_logs

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        sources = cluster_logs.log_sources(cluster, instance, controller)
        if not follow:
            cluster_logs.show(sources, lines, write)
            return
        cluster_logs.follow(lambda: cluster_logs.log_sources(cluster, instance, controller), lines, write)
    except SpotrainError as error:
        fail(str(error))
    except KeyboardInterrupt:
        pass


@app.command()
def schema() -> None:
    """The cluster spec's JSON schema (for editors: yaml-language-server, VS Code, PyCharm)."""
    from spotrain.config import ClusterSpec

    print(json.dumps(ClusterSpec.model_json_schema(mode="validation"), indent=2))


@app.command(hidden=True)  # started by cloud-init/systemd or the local provider, not by a user
def agent(user_data: Path = typer.Option(..., "--user-data", help="the agent's user-data JSON")) -> None:
    """The worker daemon (started on each VM by cloud-init/systemd, or by the local provider)."""
    from spotrain.agents.daemon import main as agent_main

    raise typer.Exit(agent_main(user_data))


def main() -> None:
    app()
