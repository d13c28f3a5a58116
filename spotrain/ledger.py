"""Durable cluster state in SQLite (WAL): runs, instances, spend, events, metrics.

Every write is one transaction, so a controller killed with SIGKILL loses nothing it had
committed. Launch requests are written before the provider is called (write-ahead), so a
restarted controller re-issues them with the same idempotency token instead of launching twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, end_reason TEXT,
    budget_usd REAL NOT NULL, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    request_id TEXT PRIMARY KEY, run_id INTEGER NOT NULL, instance_id TEXT, provider TEXT NOT NULL,
    location TEXT NOT NULL, price_usd_per_hour REAL NOT NULL, state TEXT NOT NULL,
    requested_at REAL NOT NULL, reason TEXT NOT NULL DEFAULT 'initial', launched_at REAL, ended_at REAL, end_reason TEXT,
    charged_until REAL, instance_type TEXT, gpu TEXT, gpu_count INTEGER NOT NULL DEFAULT 1,
    market TEXT NOT NULL DEFAULT 'spot');
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, request_id TEXT NOT NULL, location TEXT NOT NULL,
    t_start REAL NOT NULL, t_end REAL NOT NULL, usd REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, run_id INTEGER, t REAL NOT NULL, kind TEXT NOT NULL,
    request_id TEXT, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, t REAL NOT NULL, instance_id TEXT NOT NULL,
    state TEXT NOT NULL, epoch INTEGER NOT NULL, samples INTEGER NOT NULL,
    samples_per_second REAL NOT NULL, loss REAL, bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL, checkpoint_epoch INTEGER);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run_id, t);
CREATE INDEX IF NOT EXISTS spend_run ON spend (run_id);
"""

LIVE_STATES = ("requested", "running")


@dataclass(frozen=True)
class InstanceRow:
    request_id: str
    run_id: int
    instance_id: str | None
    provider: str
    location: str
    price_usd_per_hour: float
    state: str  # requested | running | preempted | terminated | failed
    requested_at: float
    launched_at: float | None
    ended_at: float | None
    end_reason: str | None
    charged_until: float | None
    reason: str = "initial"
    instance_type: str | None = None
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"


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
        self._db.executescript(SCHEMA)

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
                       price: float, now: float, reason: str = "initial", instance_type: str | None = None,
                       gpu: str | None = None, gpu_count: int = 1, market: str = "spot") -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO instances (request_id, run_id, provider, location, price_usd_per_hour,"
                " state, requested_at, reason, instance_type, gpu, gpu_count, market)"
                " VALUES (?, ?, ?, ?, ?, 'requested', ?, ?, ?, ?, ?, ?)",
                (request_id, run_id, provider, location, price, now, reason, instance_type, gpu, gpu_count, market),
            )
            db.execute("INSERT INTO events (run_id, t, kind, request_id, detail) VALUES (?, ?, 'launch', ?, ?)",
                       (run_id, now, request_id, f"{location} ({reason})"))

    def mark_running(self, request_id: str, instance_id: str, launched_at: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE instances SET instance_id = ?, state = 'running', launched_at = ?,"
                " charged_until = COALESCE(charged_until, ?) WHERE request_id = ? AND state = 'requested'",
                (instance_id, launched_at, launched_at, request_id),
            )

    def mark_ended(self, request_id: str, state: str, ended_at: float, reason: str, run_id: int) -> None:
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE instances SET state = ?, ended_at = ?, end_reason = ? "
                "WHERE request_id = ? AND state IN ('requested', 'running')",
                (state, ended_at, reason, request_id),
            ).rowcount
            if changed:
                db.execute("INSERT INTO events (run_id, t, kind, request_id, detail) VALUES (?, ?, ?, ?, ?)",
                           (run_id, ended_at, state, request_id, reason))

    def instances(self, states: tuple[str, ...] | None = None, run_id: int | None = None) -> list[InstanceRow]:
        query, args = "SELECT * FROM instances WHERE 1=1", []
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if run_id is not None:
            query += " AND run_id = ?"
            args.append(run_id)
        return [InstanceRow(**dict(row)) for row in self._db.execute(query + " ORDER BY requested_at", args)]

    def launch_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    # spend ------------------------------------------------------------------------------
    def charge(self, run_id: int, now: float) -> float:
        """Charge every instance that ran since it was last charged; returns the USD added."""
        added = 0.0
        with self.transaction() as db:
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
        return self._db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE run_id = ?", (run_id,)).fetchone()[0]

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
        query, args = "SELECT * FROM events WHERE run_id = ?", [run_id]
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


def _run(row: sqlite3.Row) -> Run:
    data = dict(row)
    data["spec"] = json.loads(data["spec"])
    return Run(**data)
