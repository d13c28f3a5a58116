"""One log format for every spotrain process: the controller and the agents alike.

A line is `HH:MM:SS source: message`, where the source is the logger's name with spotrain's package
prefix dropped (`agent`, `controller`, `agents.pipeline`, `hivemind.averaging...`). `spotrain logs`
shows agents' consoles and the controller's log file in this form. On a terminal, rich's handler
draws the same lines. It lives in the contracts because both sides write it and `spotrain logs`
reads it back.

hivemind is quieted to what a user needs: its warnings and errors, in the same format, minus the
ones that say nothing is wrong (spotrain.contracts.log_noise).

Every record is one line: a message of several lines is joined with "; ", and a record carrying
an exception ends with its type and text (`...: ValueError: bad value`). The traceback itself is
shown only at debug level: SPOTRAIN_LOG_LEVEL=debug in the environment of `spotrain` (the
controller; local VMs' agents inherit it) shows debug lines, the left-out noise and every
traceback. A process that crashes (an uncaught exception) still prints its traceback: that is
not a log record, and `spotrain logs` shows it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from spotrain.contracts.log_noise import wanted

LINE_FORMAT = "%(asctime)s %(source)s: %(message)s"
TIME_FORMAT = "%H:%M:%S"
LEVEL_VARIABLE = "SPOTRAIN_LOG_LEVEL"  # "debug": debug lines, left-out noise and tracebacks too
QUIETED = {"hivemind": logging.WARNING, "apscheduler": logging.ERROR, "asyncio": logging.WARNING,
           "urllib3": logging.WARNING, "botocore": logging.WARNING, "matplotlib": logging.WARNING,
           # the Google SDKs: warnings and errors (configuring "google" also keeps google-api-core
           # from cutting it off the root logger when its first client is made)
           "google": logging.WARNING,
           # its "Authentication failed using Compute Engine authentication ..." when it looks for
           # credentials: spotrain says in one line that there are none (providers/gcp.py)
           "google.auth": logging.ERROR}
_PREFIXES = ("spotrain.agents.", "spotrain.")
HELD_LINES = 10_000  # a held log file keeps at most this many lines in memory


def debugging() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class _Source(logging.Filter):
    """Names each record's source and drops what a user does not need (log_noise)."""

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
        return wanted(record, debugging())


class _OneLine(logging.Formatter):
    """The message on one line, with the exception's type and text; the traceback only when debugging.
    formatMessage is what rich's handler calls too."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage(), record.exc_info)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if debugging() and record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if debugging() and record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def one_line(message: str, exc_info=None) -> str:  # type: ignore[no-untyped-def]
    """`message` as one line, ending with the exception's type and text when there is one."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    error = exc_info[1] if exc_info else None
    if error is None:
        return text
    said = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if said and said in text:
        return f"{text} ({type(error).__name__})"  # hivemind logs an exception with its own text as the message
    return f"{text}: {type(error).__name__}: {said}" if said else f"{text}: {type(error).__name__}"


def configure(stream: TextIO | None = None, *, terminal: bool | None = None, level: int = logging.INFO,
              route_hivemind: bool = True) -> logging.Handler:
    """Send every logger's records (hivemind's too, when `route_hivemind`) to one handler on `stream`
    (stdout by default) in the one format; returns that handler."""
    stream = stream or sys.stdout
    if os.environ.get(LEVEL_VARIABLE, "").lower() == "debug":
        level = logging.DEBUG
    if terminal is None:
        terminal = bool(getattr(stream, "isatty", lambda: False)())
    root = logging.getLogger()
    root.setLevel(level)  # first: the handler shows tracebacks when debugging
    handler = _rich_handler(stream) if terminal else logging.StreamHandler(stream)
    if not terminal:
        handler.setFormatter(_OneLine(LINE_FORMAT, TIME_FORMAT))
    handler.addFilter(_Source())
    for old in [h for h in root.handlers if getattr(h, "spotrain", False)]:
        root.removeHandler(old)  # configured twice (a test, a restarted role): still one line per record
    handler.spotrain = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    for name, quiet in QUIETED.items():
        logging.getLogger(name).setLevel(quiet)
    # google-api-core sets "google" not to propagate when a client is made before it was configured
    # (its records then reach no handler): a client made before this call must not silence them
    logging.getLogger("google").propagate = True
    logging.captureWarnings(True)  # a library's warnings.warn: a line in the format too, not two on stderr
    if route_hivemind:
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")  # hivemind's records reach the root logger, not its own handler
    return handler


class LogFile(logging.FileHandler):
    """A log file (and its folder, 0700) made only once a line is written: a command refused
    before it says anything leaves nothing behind. A held file keeps its lines in memory until
    `start_writing()`: a command refused after it spoke (on stdout) still writes nothing."""

    def __init__(self, path: str, held: bool = False):
        super().__init__(path, encoding="utf-8", delay=True)
        self._held: list[logging.LogRecord] | None = [] if held else None

    def _open(self):  # type: ignore[no-untyped-def]
        os.makedirs(os.path.dirname(self.baseFilename), mode=0o700, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is None:
            super().emit(record)
        elif len(self._held) < HELD_LINES:
            self._held.append(record)

    def start_writing(self) -> None:
        """Write the lines held so far, and every later line as it comes."""
        with self.lock:  # type: ignore[union-attr]  # a Handler's lock, made in its __init__
            held, self._held = self._held or [], None
            for record in held:
                super().emit(record)


def add_file(path: str, held: bool = False) -> LogFile:
    """Also append every record to the file at `path`, in the one format (the controller's log)."""
    handler = LogFile(path, held)
    handler.setFormatter(_OneLine(LINE_FORMAT, TIME_FORMAT))
    handler.addFilter(_Source())
    logging.getLogger().addHandler(handler)
    return handler


def _rich_handler(stream: TextIO) -> logging.Handler:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(file=stream, soft_wrap=True), show_level=False, show_path=False,
                          log_time_format=f"[{TIME_FORMAT}]", markup=False, rich_tracebacks=debugging())
    handler.setFormatter(_OneLine("%(source)s: %(message)s"))
    return handler
