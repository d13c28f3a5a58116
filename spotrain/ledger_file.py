"""Open a cluster's ledger.db so that a file that is no ledger is one line naming it, not a traceback."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spotrain.errors import SpotrainError
from spotrain.ledger import Ledger

SQLITE_HEADER = b"SQLite format 3\0"


class LedgerUnreadable(SpotrainError):
    """The ledger file is garbage, truncated, empty, a directory, or cannot be read."""


def _check_header(path: Path) -> None:
    """Refuse what SQLite would fail on, or silently turn into a new ledger (an empty file), before
    SQLite opens it: a read command then writes nothing."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise LedgerUnreadable(f"{path}: not a ledger (not a regular file)")
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise LedgerUnreadable(f"{path}: cannot read the ledger: {error.strerror}") from None
    if header != SQLITE_HEADER:
        what = "an empty file" if not header else "no SQLite header"
        raise LedgerUnreadable(f"{path}: not a spotrain ledger ({what}); move it away to start afresh")


@contextmanager
def opened_ledger(path: Path, create: bool = False) -> Iterator[Ledger]:
    """The ledger at `path` (made when `create` and missing), closed on exit. SQLite's errors about
    the file, at open or later in the block (a truncated file fails only when a lost page is read),
    become one line naming it."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink() or not create:
        _check_header(path)
    try:
        ledger = Ledger(path)
    except sqlite3.DatabaseError as error:
        raise LedgerUnreadable(f"{path}: cannot use the ledger: {error}") from None
    try:
        yield ledger
    except sqlite3.DatabaseError as error:
        raise LedgerUnreadable(f"{path}: cannot use the ledger: {error}") from None
    finally:
        ledger.close()
