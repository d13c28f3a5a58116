"""One log format for every spotrain process: the controller and the agents alike.

A line is `HH:MM:SS source: message`, where the source is the logger's name with spotrain's package
prefix dropped (`agent`, `controller`, `agents.pipeline`, `hivemind.averaging...`). `spotrain logs`
shows agents' consoles and the controller's log file in this form. On a terminal, rich's handler
draws the same lines. It lives in the contracts because both sides write it and `spotrain logs`
reads it back.

hivemind is quieted to what a user needs: its warnings and errors, in the same format, minus the
ones spotrain's own settings cause knowingly (`KNOWN_NOISE`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LINE_FORMAT = "%(asctime)s %(source)s: %(message)s"
TIME_FORMAT = "%H:%M:%S"
QUIETED = {"hivemind": logging.WARNING, "apscheduler": logging.ERROR, "asyncio": logging.WARNING,
           "urllib3": logging.WARNING, "botocore": logging.WARNING, "matplotlib": logging.WARNING}
# hivemind warnings that say nothing a user can act on
KNOWN_NOISE = (
    # spotrain gives matchmaking the whole averaging window on purpose (agents/roles/data_parallel.py)
    "It is recommended to use request_timeout smaller than min_matchmaking_time",
    # two averaging rounds asked for at once: hivemind queues the second one, as it should
    "Another look_for_group is already in progress",
)
_PREFIXES = ("spotrain.agents.", "spotrain.")


class _Source(logging.Filter):
    """Names each record's source and drops the known noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        record.source = name
        for quieted, level in QUIETED.items():  # here, not only by logger level: hivemind sets each of its
            if (record.name == quieted or record.name.startswith(quieted + ".")) and record.levelno < level:
                return False  # loggers' level itself (HIVEMIND_LOGLEVEL)
        message = record.getMessage()
        return not any(message.startswith(noise) for noise in KNOWN_NOISE)


def configure(stream: TextIO | None = None, *, terminal: bool | None = None, level: int = logging.INFO,
              route_hivemind: bool = True) -> logging.Handler:
    """Send every logger's records (hivemind's too, when `route_hivemind`) to one handler on `stream`
    (stdout by default) in the one format; returns that handler."""
    stream = stream or sys.stdout
    if terminal is None:
        terminal = bool(getattr(stream, "isatty", lambda: False)())
    handler = _rich_handler(stream) if terminal else logging.StreamHandler(stream)
    if not terminal:
        handler.setFormatter(logging.Formatter(LINE_FORMAT, TIME_FORMAT))
    handler.addFilter(_Source())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "spotrain", False)]:
        root.removeHandler(old)  # configured twice (a test, a restarted role): still one line per record
    handler.spotrain = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet in QUIETED.items():
        logging.getLogger(name).setLevel(quiet)
    if route_hivemind:
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")  # hivemind's records reach the root logger, not its own handler
    return handler


class _FileOnFirstLine(logging.FileHandler):
    """A log file (and its folder, 0700) made only once a line is written: a command refused
    before it says anything leaves nothing behind."""

    def _open(self):  # type: ignore[no-untyped-def]
        os.makedirs(os.path.dirname(self.baseFilename), mode=0o700, exist_ok=True)
        return super()._open()


def add_file(path: str) -> logging.Handler:
    """Also append every record to the file at `path`, in the one format (the controller's log)."""
    handler = _FileOnFirstLine(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(LINE_FORMAT, TIME_FORMAT))
    handler.addFilter(_Source())
    logging.getLogger().addHandler(handler)
    return handler


def _rich_handler(stream: TextIO) -> logging.Handler:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(file=stream, soft_wrap=True), show_level=False, show_path=False,
                          log_time_format=f"[{TIME_FORMAT}]", markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(source)s: %(message)s"))
    return handler
