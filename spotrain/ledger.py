"""Durable cluster state in SQLite (WAL): runs, instances, spend, events, metrics.

Every write is one transaction, so a controller killed with SIGKILL loses nothing it had
committed. Launch requests are written before the provider is called (write-ahead), so a
restarted controller re-issues them with the same idempotency token instead of launching twice.
States and reasons are stored as their enums' values; the schema and its migrations are in
spotrain/ledger_schema.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spotrain.contracts.states import LIVE_STATES, EndReason, InstanceState, LaunchReason
from spotrain.egress import BYTES_PER_GB, EgressReading, usd_of
from spotrain.ledger_schema import migrate


@dataclass(frozen=True)
class InstanceRow:
    request_id: str
    run_id: int
    instance_id: str | None
    provider: str
    location: str
    price_usd_per_hour: float
    state: InstanceState
    requested_at: float
    launched_at: float | None
    ended_at: float | None
    end_reason: EndReason | None
    charged_until: float | None
    reason: LaunchReason = LaunchReason.INITIAL
    instance_type: str | None = None
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"
    end_detail: str = ""  # the end reason's particulars: an error's message, an exit code


@dataclass(frozen=True)
class Run:
    id: int
    started_at: float
    ended_at: float | None
    end_reason: str | None
    budget_usd: float
    spec: dict


class Ledger:
    def __init__(self, path: Path | str):
        self.path = path  # ":memory:" for simulations
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        migrate(self._db, str(path))

    @classmethod
    def create(cls, path: Path) -> Ledger:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open_existing(cls, path: Path) -> Ledger:
        if not path.exists():
            raise FileNotFoundError(path)
        return cls(path)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # meta -------------------------------------------------------------------------------
    def set_meta(self, key: str, value: object) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: object = None) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    # runs -------------------------------------------------------------------------------
    def current_run(self) -> Run | None:
        row = self._db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        return _run(row) if row else None

    def run(self, run_id: int) -> Run | None:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run(row) if row else None

    def run_ids(self) -> list[int]:
        return [row[0] for row in self._db.execute("SELECT id FROM runs ORDER BY id")]

    def open_run(self, budget_usd: float, spec: dict, now: float) -> Run:
        """The run in progress, or a new one when the last has ended."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            if row is not None and row["ended_at"] is None:
                db.execute("UPDATE runs SET budget_usd = ?, spec = ? WHERE id = ?",
                           (budget_usd, json.dumps(spec), row["id"]))
                run_id = row["id"]
            else:
                run_id = db.execute(
                    "INSERT INTO runs (started_at, budget_usd, spec) VALUES (?, ?, ?)",
                    (now, budget_usd, json.dumps(spec)),
                ).lastrowid
                db.execute("INSERT INTO events (run_id, t, kind, detail) VALUES (?, ?, 'run-started', ?)",
                           (run_id, now, f"budget ${budget_usd:.2f}"))
        run = self.current_run()
        assert run is not None and run.id == run_id
        return run

    def end_run(self, run_id: int, reason: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
                       (now, reason, run_id))
            db.execute("INSERT INTO events (run_id, t, kind, detail) VALUES (?, ?, 'run-ended', ?)",
                       (run_id, now, reason))

    # instances --------------------------------------------------------------------------
    def record_request(self, run_id: int, request_id: str, provider: str, location: str,
                       price: float, now: float, reason: LaunchReason = LaunchReason.INITIAL,
                       instance_type: str | None = None, gpu: str | None = None, gpu_count: int = 1,
                       market: str = "spot") -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO instances (request_id, run_id, provider, location, price_usd_per_hour,"
                " state, requested_at, reason, instance_type, gpu, gpu_count, market)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, run_id, provider, location, price, InstanceState.REQUESTED, now, reason, instance_type,
                 gpu, gpu_count, market),
            )
            db.execute("INSERT INTO events (run_id, t, kind, request_id, detail) VALUES (?, ?, 'launch', ?, ?)",
                       (run_id, now, request_id, f"{location} ({reason})"))

    def mark_running(self, request_id: str, instance_id: str, launched_at: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE instances SET instance_id = ?, state = ?, launched_at = ?,"
                " charged_until = COALESCE(charged_until, ?) WHERE request_id = ? AND state = ?",
                (instance_id, InstanceState.RUNNING, launched_at, launched_at, request_id, InstanceState.REQUESTED),
            )

    def mark_ended(self, request_id: str, state: InstanceState, ended_at: float, reason: EndReason, run_id: int,
                   detail: str = "") -> None:
        with self.transaction() as db:
            # never before what was charged: the controller saw it running until then (a local VM lost
            # without notice reports its state file's last write, its boot, as its end)
            changed = db.execute(
                "UPDATE instances SET state = ?, ended_at = MAX(?, COALESCE(charged_until, ?)), end_reason = ?, "
                f"end_detail = ? WHERE request_id = ? AND state IN ({','.join('?' * len(LIVE_STATES))})",
                (state, ended_at, ended_at, reason, detail, request_id, *LIVE_STATES),
            ).rowcount
            if changed:
                db.execute("INSERT INTO events (run_id, t, kind, request_id, detail) VALUES (?, ?, ?, ?, ?)",
                           (run_id, ended_at, state, request_id, f"{reason}: {detail}" if detail else reason))

    def instances(self, states: tuple[InstanceState, ...] | None = None,
                  run_id: int | None = None) -> list[InstanceRow]:
        query = "SELECT * FROM instances WHERE 1=1"
        args: list[object] = []
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if run_id is not None:
            query += " AND run_id = ?"
            args.append(run_id)
        return [_instance_row(row) for row in self._db.execute(query + " ORDER BY requested_at", args)]

    def launch_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    # spend ------------------------------------------------------------------------------
    def charge(self, run_id: int, now: float, egress: Iterable[EgressReading] = ()) -> float:
        """Charge every instance that ran since it was last charged, and the growth of every egress
        counter, in one transaction; returns the USD added."""
        added = 0.0
        with self.transaction() as db:
            added += _charge_egress(db, run_id, now, egress)
            rows = db.execute(
                "SELECT * FROM instances WHERE launched_at IS NOT NULL AND charged_until IS NOT NULL "
                "AND charged_until < COALESCE(ended_at, ?)", (now,)
            ).fetchall()
            for row in rows:
                until = min(now, row["ended_at"] if row["ended_at"] is not None else now)
                usd = row["price_usd_per_hour"] * (until - row["charged_until"]) / 3600.0
                db.execute(
                    "INSERT INTO spend (run_id, request_id, location, t_start, t_end, usd) VALUES (?, ?, ?, ?, ?, ?)",
                    (row["run_id"], row["request_id"], row["location"], row["charged_until"], until, usd),
                )
                db.execute("UPDATE instances SET charged_until = ? WHERE request_id = ?", (until, row["request_id"]))
                added += usd
        return added

    def spent(self, run_id: int) -> float:
        """Instance time and egress."""
        return self._db.execute(
            "SELECT (SELECT COALESCE(SUM(usd), 0) FROM spend WHERE run_id = ?)"
            " + (SELECT COALESCE(SUM(usd), 0) FROM egress WHERE run_id = ?)", (run_id, run_id)).fetchone()[0]

    def egress_spent(self, run_id: int) -> float:
        return self._db.execute("SELECT COALESCE(SUM(usd), 0) FROM egress WHERE run_id = ?", (run_id,)).fetchone()[0]

    def egress_by_path(self, run_id: int) -> list[dict]:
        """{source, destination, gb, usd} per path the run sent tensors over, dearest first."""
        rows = self._db.execute(
            "SELECT source, destination, SUM(bytes) AS bytes, SUM(usd) AS usd FROM egress WHERE run_id = ?"
            " GROUP BY source, destination ORDER BY SUM(usd) DESC, source, destination", (run_id,))
        return [{"source": r["source"], "destination": r["destination"], "gb": r["bytes"] / BYTES_PER_GB,
                 "usd": r["usd"]} for r in rows]

    def egress_intervals(self, run_id: int) -> list[sqlite3.Row]:
        """Every egress charge of the run: t, instance_id, peer, source, destination, bytes, usd_per_gb, usd."""
        return self._db.execute("SELECT * FROM egress WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()

    def egress_usd_per_hour(self, run_id: int, now: float, window_seconds: float, tick_seconds: float) -> float:
        """The fleet's egress burn over the last `window_seconds` (less when the run's first egress
        charge is younger; each charge covers about the tick before it)."""
        total, first = self._db.execute(
            "SELECT COALESCE(SUM(usd), 0), (SELECT MIN(t) FROM egress WHERE run_id = ?) FROM egress"
            " WHERE run_id = ? AND t > ?", (run_id, run_id, now - window_seconds)).fetchone()
        if not total:
            return 0.0
        span = min(window_seconds, now - first + tick_seconds)
        return total / max(span, tick_seconds) * 3600.0

    def spend_intervals(self, run_id: int) -> list[sqlite3.Row]:
        """Every charge of the run: request_id, location, t_start, t_end, usd, in the order charged."""
        return self._db.execute("SELECT * FROM spend WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()

    def spend_by_location(self, run_id: int) -> list[dict]:
        rows = self._db.execute(
            "SELECT location, SUM(usd) AS usd, SUM(t_end - t_start) AS seconds FROM spend "
            "WHERE run_id = ? GROUP BY location ORDER BY location", (run_id,)
        )
        return [{"location": r["location"], "usd": r["usd"], "seconds": r["seconds"]} for r in rows]

    # events and metrics -----------------------------------------------------------------
    def event(self, run_id: int | None, kind: str, now: float, detail: str = "", request_id: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO events (run_id, t, kind, request_id, detail) VALUES (?, ?, ?, ?, ?)",
                       (run_id, now, kind, request_id, detail))

    def events(self, run_id: int, kinds: tuple[str, ...] | None = None) -> list[sqlite3.Row]:
        query = "SELECT * FROM events WHERE run_id = ?"
        args: list[object] = [run_id]
        if kinds:
            query += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        return self._db.execute(query + " ORDER BY id", args).fetchall()

    def record_metrics(self, run_id: int, now: float, statuses: list[dict]) -> None:
        if not statuses:
            return
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO metrics (run_id, t, instance_id, state, epoch, samples, samples_per_second, loss,"
                " bytes_sent, bytes_received, checkpoint_epoch) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(run_id, now, s["instance_id"], s["state"], s["epoch"], s["samples"], s["samples_per_second"],
                  s.get("loss"), s["bytes_sent"], s["bytes_received"], s.get("checkpoint_epoch"))
                 for s in statuses],
            )

    def metrics(self, run_id: int) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY t, id", (run_id,)).fetchall()


def _charge_egress(db: sqlite3.Connection, run_id: int, now: float, readings: Iterable[EgressReading]) -> float:
    """Charge what each counter grew by since it was last charged; a stale (smaller) reading charges nothing."""
    added = 0.0
    for r in readings:
        key = (run_id, r.instance_id, r.since, r.peer)
        row = db.execute("SELECT bytes FROM egress_counters WHERE run_id = ? AND instance_id = ? AND since = ?"
                         " AND peer = ?", key).fetchone()
        grown = r.total_bytes - (row["bytes"] if row else 0)
        if grown <= 0:
            continue
        usd = usd_of(grown, r.usd_per_gb)
        db.execute("INSERT INTO egress (run_id, t, instance_id, peer, source, destination, bytes, usd_per_gb, usd)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (run_id, now, r.instance_id, r.peer, r.source, r.destination, grown, r.usd_per_gb, usd))
        db.execute("INSERT OR REPLACE INTO egress_counters VALUES (?, ?, ?, ?, ?)", (*key, r.total_bytes))
        added += usd
    return added


def _run(row: sqlite3.Row) -> Run:
    data = dict(row)
    data["spec"] = json.loads(data["spec"])
    return Run(**data)


def _instance_row(row: sqlite3.Row) -> InstanceRow:
    data = dict(row)
    data["state"] = InstanceState(data["state"])
    data["reason"] = LaunchReason(data["reason"])
    data["end_reason"] = EndReason(data["end_reason"]) if data["end_reason"] is not None else None
    return InstanceRow(**data)
