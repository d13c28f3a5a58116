"""The ledger's schema as an ordered list of migrations; `PRAGMA user_version` counts those applied.

A ledger is brought up to date when it is opened. One written by a newer spotrain is refused:
this code cannot know what that version's later migrations changed.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

from spotrain.contracts.states import EndReason, InstanceState
from spotrain.errors import LedgerTooNew

# Version 1 is the schema spotrain wrote before it versioned ledgers (they read user_version 0).
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, end_reason TEXT,
    budget_usd REAL NOT NULL, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    request_id TEXT PRIMARY KEY, run_id INTEGER NOT NULL, instance_id TEXT, provider TEXT NOT NULL,
    location TEXT NOT NULL, price_usd_per_hour REAL NOT NULL, state TEXT NOT NULL,
    requested_at REAL NOT NULL, reason TEXT NOT NULL DEFAULT 'initial',
    launched_at REAL, ended_at REAL, end_reason TEXT,
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

# Version 1 stored an end reason as free text; these are the words it used beside EndReason's values.
LEGACY_END_REASONS = {
    "spot interruption": EndReason.SPOT_PREEMPTION,  # AWS, after its two-minute notice
    "Client.UserInitiatedShutdown": EndReason.TERMINATED_BY_REQUEST,  # AWS's state reason code
}
LEGACY_END_REASONS_WITH_DETAIL = (
    (re.compile(r"agent failed \((.*)\)"), EndReason.AGENT_FAILED),
    (re.compile(r"no offer in (.*)"), EndReason.NO_OFFER),
)


def create_tables(db: sqlite3.Connection) -> None:
    for statement in SCHEMA_1.split(";"):  # not executescript: it would commit the open transaction
        db.execute(statement)


def type_end_reasons(db: sqlite3.Connection) -> None:
    """End reasons become EndReason values; their particulars move to a column of their own."""
    db.execute("ALTER TABLE instances ADD COLUMN end_detail TEXT NOT NULL DEFAULT ''")
    rows = db.execute("SELECT request_id, state, end_reason FROM instances WHERE end_reason IS NOT NULL").fetchall()
    for request_id, state, text in rows:
        reason, detail = legacy_end_reason(InstanceState(state), text)
        db.execute("UPDATE instances SET end_reason = ?, end_detail = ? WHERE request_id = ?",
                   (reason, detail, request_id))


def legacy_end_reason(state: InstanceState, text: str) -> tuple[EndReason, str]:
    """The EndReason and detail of an end reason that schema version 1 stored as text."""
    if text in {reason.value for reason in EndReason}:
        return EndReason(text), ""
    if text in LEGACY_END_REASONS:
        return LEGACY_END_REASONS[text], ""
    for pattern, reason in LEGACY_END_REASONS_WITH_DETAIL:
        match = pattern.fullmatch(text)
        if match:
            return reason, match.group(1)
    if state == InstanceState.FAILED:
        return EndReason.LAUNCH_FAILED, text  # the provider error's type and message
    return EndReason.ENDED_BY_PROVIDER, text  # a cloud's own state code or status


# Version 3: egress. `egress` holds every charge (the growth of one agent's counter for one destination
# since the last charge); `egress_counters` the counter value charged so far, per agent process
# (`since`) and destination, so a record read twice or a controller restarted charges nothing twice.
SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS egress (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, t REAL NOT NULL, instance_id TEXT NOT NULL,
    peer TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL, bytes INTEGER NOT NULL,
    usd_per_gb REAL NOT NULL, usd REAL NOT NULL);
CREATE INDEX IF NOT EXISTS egress_run ON egress (run_id, t);
CREATE TABLE IF NOT EXISTS egress_counters (
    run_id INTEGER NOT NULL, instance_id TEXT NOT NULL, since REAL NOT NULL, peer TEXT NOT NULL,
    bytes INTEGER NOT NULL, PRIMARY KEY (run_id, instance_id, since, peer));
"""


def add_egress(db: sqlite3.Connection) -> None:
    for statement in SCHEMA_3.split(";"):
        db.execute(statement)


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (create_tables, type_end_reasons, add_egress)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection, name: str) -> None:
    """Apply the migrations the ledger `name` lacks, all in one transaction with the new version."""
    if schema_version(db) == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # read again under the lock: another process may have migrated
        if version > SCHEMA_VERSION:
            raise LedgerTooNew(f"ledger {name} has schema version {version}, newer than this spotrain's "
                               f"{SCHEMA_VERSION}: upgrade spotrain to open it")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[number - 1](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
