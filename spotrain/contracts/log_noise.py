"""Which log records a user needs (spotrain.contracts.log_format shows only those).

Dropped (shown only under SPOTRAIN_LOG_LEVEL=debug):
- hivemind warnings that spotrain's own settings cause knowingly (`KNOWN_NOISE`);
- two asyncio reports about hivemind's own loops that say nothing is wrong:
  "Task exception was never retrieved" for an `InvalidStateError` raised inside hivemind when it
  sets the result of an averaging step that was cancelled meanwhile (averager.py's `_step`: the
  step's caller gave up, so nobody waits for that result), and "Task was destroyed but it is
  pending!" once the agent is leaving (`leaving()`): hivemind's loops stop with the process.
Thinned: a warning that repeats each averaging round (`REPEATING`) is shown once, then at most
once every `REPEAT_SECONDS`, with the count of those left out.

Every other record stays, so an unexpected error is still seen (as one line: log_format).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable

# hivemind warnings that say nothing a user can act on
KNOWN_NOISE = (
    # spotrain gives matchmaking the whole averaging window on purpose (agents/roles/data_parallel.py)
    "It is recommended to use request_timeout smaller than min_matchmaking_time",
    # two averaging rounds asked for at once: hivemind queues the second one, as it should
    "Another look_for_group is already in progress",
)
# a peer's parts missing from one round (it left, or its parts were refused): worth seeing, not every round
REPEATING = ("Reducer: received ",)
REPEAT_SECONDS = 60.0

_leaving = False


def leaving() -> None:
    """This process is shutting down after a clean drain: pending asyncio tasks it destroys are expected."""
    global _leaving
    _leaving = True


def benign(record: logging.LogRecord) -> bool:
    """One of the asyncio reports about hivemind's loops that say nothing is wrong (the module's doc)."""
    if record.name != "asyncio":
        return False
    message = record.getMessage()
    if message.startswith("Task was destroyed but it is pending!"):
        return _leaving
    error = record.exc_info[1] if record.exc_info else None
    return (message.startswith("Task exception was never retrieved")
            and isinstance(error, (concurrent.futures.InvalidStateError, asyncio.InvalidStateError))
            and "CANCELLED" in str(error) and _raised_in_hivemind(error))


def _raised_in_hivemind(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return "/hivemind/" in frame.tb_frame.f_code.co_filename


class Repeats:
    """Thins the `REPEATING` warnings: the first, then one per `every` seconds, telling how many were left out."""

    def __init__(self, every: float = REPEAT_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self._shown: dict[str, float] = {}  # prefix -> when one was last shown
        self._left_out: dict[str, int] = {}

    def keep(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in REPEATING if message.startswith(p)), None)
        if prefix is None:
            return True
        now = self.clock()
        if prefix in self._shown and now - self._shown[prefix] < self.every:
            self._left_out[prefix] = self._left_out.get(prefix, 0) + 1
            return False
        left_out = self._left_out.pop(prefix, 0)
        if left_out:
            record.msg, record.args = f"{message} ({left_out} more like it in the last {self.every:.0f}s)", ()
        self._shown[prefix] = now
        return True


_repeats = Repeats()


def wanted(record: logging.LogRecord, debug: bool) -> bool:
    """Whether a user sees this record (decided once per record: every handler agrees)."""
    decided = getattr(record, "spotrain_wanted", None)
    if decided is None:
        message = record.getMessage()
        decided = debug or not (benign(record) or any(message.startswith(noise) for noise in KNOWN_NOISE))
        decided = decided and (debug or _repeats.keep(record))
        record.spotrain_wanted = decided
    return bool(decided)
