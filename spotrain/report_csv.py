"""`spotrain report --csv DIR`: one run's ledger as CSV files, one per table, plus the per-location
summary; times are Unix seconds, as the ledger keeps them."""

from __future__ import annotations

import csv
from dataclasses import asdict, fields
from pathlib import Path

from spotrain.errors import SpotrainError
from spotrain.ledger import InstanceRow, Ledger, Run
from spotrain.report_data import by_location

SPEND_COLUMNS = ("request_id", "location", "t_start", "t_end", "usd")
METRICS_COLUMNS = ("t", "instance_id", "state", "epoch", "samples", "samples_per_second", "loss",
                   "bytes_sent", "bytes_received", "checkpoint_epoch")
EGRESS_COLUMNS = ("t", "instance_id", "peer", "source", "destination", "bytes", "usd_per_gb", "usd")
EVENTS_COLUMNS = ("t", "kind", "request_id", "detail")
LOCATIONS_COLUMNS = ("location", "instances", "seconds", "usd", "samples", "cost_per_million_samples_usd",
                     "on_demand_usd", "on_demand_cost_per_million_samples_usd")


def write_csv(ledger: Ledger, run: Run, folder: Path) -> list[Path]:
    """instances.csv, spend.csv, egress.csv, metrics.csv, events.csv and locations.csv of `run` in `folder`."""
    tables = {
        "instances.csv": ([f.name for f in fields(InstanceRow)],
                          [asdict(row) for row in ledger.instances(run_id=run.id)]),
        "spend.csv": (SPEND_COLUMNS, [dict(row) for row in ledger.spend_intervals(run.id)]),
        "egress.csv": (EGRESS_COLUMNS, [dict(row) for row in ledger.egress_intervals(run.id)]),
        "metrics.csv": (METRICS_COLUMNS, [dict(row) for row in ledger.metrics(run.id)]),
        "events.csv": (EVENTS_COLUMNS, [dict(row) for row in ledger.events(run.id)]),
        "locations.csv": (LOCATIONS_COLUMNS, by_location(ledger, run)),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, (columns, rows) in tables.items():
            path = folder / name
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            written.append(path)
    except OSError as error:
        raise SpotrainError(f"--csv {folder}: cannot write: {error.strerror}") from None
    return written
