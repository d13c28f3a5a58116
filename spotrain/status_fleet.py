"""The fleet as `spotrain status` shows it: each live instance with its role, a line per location,
and the table of workers, fitted to the terminal (or to 80 columns when piped)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from spotrain.contracts.states import LIVE_STATES, InstanceState
from spotrain.errors import SpecError
from spotrain.fleet_roles import recorded_swarm_labels, roles
from spotrain.ledger import Ledger, Run
from spotrain.spec_file import stored_spec


def workers_of(ledger: Ledger, run: Run) -> list[dict]:
    """The run's live instances in launch order, each with its newest agent figures and its role."""
    latest: dict[str, dict] = {}
    for metric in ledger.metrics(run.id):
        latest[metric["instance_id"]] = dict(metric)
    rows = ledger.instances(states=LIVE_STATES, run_id=run.id)
    try:
        spec = stored_spec(run.spec)  # never the task's code: status must work when it is gone
    except SpecError:  # a spec from a version that knew other keys: the roles are unknown, the rest stands
        role_of = {row.request_id: "-" for row in rows}
    else:
        swarm = recorded_swarm_labels(ledger, run) if spec.training.mode == "swarm" else None
        agent_states = {row.instance_id or "": latest.get(row.instance_id or "", {}).get("state") for row in rows}
        role_of = roles(rows, agent_states, spec.placement.workers, swarm)
    workers = []
    for row in rows:
        m = latest.get(row.instance_id or "", {})
        workers.append({"instance_id": row.instance_id, "location": row.location, "state": row.state,
                        "role": role_of[row.request_id], "price_usd_per_hour": row.price_usd_per_hour,
                        "agent_state": m.get("state"), "epoch": m.get("epoch"),
                        "samples_per_second": m.get("samples_per_second"), "loss": m.get("loss")})
    return workers


def activity(worker: dict) -> str:
    """What an instance does now: its agent's state, else where it is on its way there."""
    if worker["state"] == InstanceState.REQUESTED:
        return "requested"
    return worker["agent_state"] or "booting"  # running, its agent not heard from yet


def location_lines(workers: list[dict]) -> list[str]:
    """One line per location: what its instances do and their roles, e.g.
    `local:zone-b: 3 training, 1 starting (3 worker, 1 backup)`."""
    lines = []
    for location in sorted({w["location"] for w in workers}):
        here = [w for w in workers if w["location"] == location]
        doing = _counts(activity(w) for w in here)
        role_counts = _counts(w["role"] for w in here)
        lines.append(f"{location}: {doing} ({role_counts})")
    return lines


def _counts(values) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{n} {value}" for value, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]
    keep: int  # the higher, the later it is dropped when the table does not fit


def worker_columns(duty: list[str]) -> list[Column]:
    def number(key: str, fmt: str) -> Callable[[dict], str]:
        return lambda w: "-" if w[key] is None else format(w[key], fmt)

    return [
        Column("instance", lambda w: w["instance_id"] or "-", 10),
        Column("location", lambda w: w["location"], 9),
        Column("state", activity, 8),
        Column("role", lambda w: w["role"], 7),
        Column("samples/s", number("samples_per_second", ".1f"), 6),
        Column("duty", lambda w: "yes" if w["instance_id"] in duty else "-", 5),  # it writes checkpoints
        Column("$/h", number("price_usd_per_hour", ".3f"), 4),
        Column("epoch", number("epoch", "d"), 3),
        Column("loss", number("loss", ".3f"), 2),
    ]


class FittedTable:
    """A table that leaves out its least important columns, rather than cutting every cell short,
    when the console is narrower than it needs; the kept columns never wrap."""

    def __init__(self, columns: list[Column], rows: list[dict], title: str | None = None):
        self.columns, self.rows, self.title = columns, rows, title

    def fitted(self, width: int) -> list[Column]:
        cells = {c.header: [c.cell(r) for r in self.rows] for c in self.columns}
        need = {c.header: max([len(c.header), *map(len, cells[c.header])]) for c in self.columns}
        kept = list(self.columns)
        while len(kept) > 1 and sum(need[c.header] + 3 for c in kept) + 1 > width:  # "│ x " per column, "│"
            kept.remove(min(kept, key=lambda c: c.keep))
        return kept

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=self.title)
        kept = self.fitted(options.max_width)
        for column in kept:
            table.add_column(column.header, no_wrap=True)
        for row in self.rows:
            table.add_row(*(c.cell(row) for c in kept))
        yield table
