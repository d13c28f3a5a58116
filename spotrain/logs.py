"""`spotrain logs`: the controller's log and each agent's, read without the task's code.

The controller's lines go to $SPOTRAIN_HOME/clusters/<name>/controller.log (a detached
controller's stdout is that file; a foreground one copies its lines there). An agent's log is
its instance's console as the provider shows it: a local VM's agent.log, EC2's console output,
GCE's serial port 1. Only the ledger and the stored spec are read, never the user's task.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spotrain.errors import SpotrainError
from spotrain.home import cluster_dir, cluster_names, existing_cluster, ledger_path

CONTROLLER = "controller"


def controller_log_path(name: str) -> Path:
    return cluster_dir(name) / "controller.log"


def log_to_file(name: str) -> Callable[[], None]:
    """Append the controller's log lines to its log file too, unless stdout already is that file
    (a detached controller). The lines are held until the returned function is called, once the
    controller holds the cluster: a launch refused before that (credentials, a busy port, another
    controller) writes no file."""
    from spotrain.contracts.log_format import add_file

    path = controller_log_path(name)
    if _stdout_is(path):
        return lambda: None
    return add_file(str(path), held=True).start_writing  # the file (and the cluster's folder) from then on


def _stdout_is(path: Path) -> bool:
    try:
        ours, theirs = os.fstat(sys.stdout.fileno()), path.stat()
    except (OSError, ValueError, AttributeError):  # no such file yet, or a stdout without a descriptor
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


# A cloud VM whose agent's unit gave up prints its journal's last lines on the console with this
# prefix, then powers off (infra/spotrain-agent-failed.sh); the header line says the exit status.
AGENT_FAILED_MARKER = "spotrain: agent failed: "
AGENT_FAILED_HEADER = re.compile(r"spotrain: agent failed \(((?:exit|signal) [^)]*)\)")
TRACEBACK = "Traceback (most recent call last):"
TRACEBACK_WITHIN = 40  # a traceback that starts further back than this is cut to the last lines


def agent_lines(console: str) -> str:
    """The agent's own lines in a console: the failure marker's lines when the VM printed them
    (a cloud console also holds boot and cloud-init), else the whole text (a local agent.log)."""
    marked = [line.split(AGENT_FAILED_MARKER, 1)[1] for line in console.splitlines() if AGENT_FAILED_MARKER in line]
    return "\n".join(marked) if marked else console


def failed_exit(console: str) -> str | None:
    """The exit status the failure marker's header names ("exit 1"); None without one."""
    found = AGENT_FAILED_HEADER.findall(console)
    return found[-1] if found else None


def last_error_lines(text: str, limit: int = 12) -> list[str]:
    """The end of a failed process's log: from its last traceback's header on when that is among
    the last TRACEBACK_WITHIN lines (so it never starts mid-traceback), else its last `limit` lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    tracebacks = [i for i, line in enumerate(lines) if line.strip() == TRACEBACK]
    if tracebacks and len(lines) - tracebacks[-1] <= TRACEBACK_WITHIN:
        return lines[tracebacks[-1]:]
    return lines[-limit:]


@dataclass(frozen=True)
class LogSource:
    label: str  # "controller" or an instance id
    title: str
    read: Callable[[], str]


def log_sources(cluster: str | None, instance: str | None, controller: bool) -> list[LogSource]:
    """The controller's log and the agents' of the latest run (or one instance's, of any run)."""
    from spotrain.ledger_file import opened_ledger
    from spotrain.provider_factory import make_provider
    from spotrain.spec_file import stored_spec

    name, instance = _resolve(cluster, instance)
    path = controller_log_path(name)
    sources = [LogSource(CONTROLLER, f"controller ({path})", lambda: _read_file(path))]
    if controller:
        return sources
    with opened_ledger(ledger_path(name)) as ledger:
        run = ledger.current_run()
        rows = ledger.instances() if instance else ledger.instances(run_id=run.id) if run else []
    rows = [r for r in rows if r.instance_id and instance in (None, r.instance_id)]
    if instance is not None:
        if not rows:
            raise SpotrainError(f"no instance {instance!r} in cluster {name!r}; "
                                f"`spotrain logs {name}` shows every one")
        sources = []
    if rows and run is not None:
        provider = make_provider(stored_spec(run.spec))
        sources += [LogSource(row.instance_id or "", f"{row.instance_id} ({row.location}, {row.state})",
                              _console_reader(provider, row.instance_id or "", row.location)) for row in rows]
    return sources


def _resolve(cluster: str | None, instance: str | None) -> tuple[str, str | None]:
    names = cluster_names()
    if cluster is not None and cluster not in names and instance is None and len(names) == 1:
        return names[0], cluster  # `spotrain logs i-...`: an instance of the only cluster
    return existing_cluster(cluster), instance


def _read_file(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _console_reader(provider, instance_id: str, location: str) -> Callable[[], str]:
    return lambda: provider.console_output(instance_id, location)


def _read(source: LogSource) -> str:
    from spotrain.providers.base import ProviderError

    try:
        return source.read()
    except ProviderError as error:  # one instance's cloud refusing is that instance's line, not the end
        return f"(cannot read the log: {error})\n"


def tail(text: str, lines: int) -> str:
    """The last `lines` lines of `text` (all when lines <= 0), each ending with a newline."""
    kept = text.splitlines()
    return "".join(f"{line}\n" for line in (kept[-lines:] if lines > 0 else kept))


def show(sources: list[LogSource], lines: int, write: Callable[[str], None]) -> None:
    for source in sources:
        text = _read(source)
        write(f"==> {source.title} <==\n" + (tail(text, lines) or "(nothing logged yet)\n"))


def follow(refresh: Callable[[], list[LogSource]], lines: int, write: Callable[[str], None],
           every: float = 1.0, rounds: int | None = None) -> None:
    """Print the last `lines` of each log, then what is added to any of them, until interrupted
    (or for `rounds` polls); instances launched meanwhile join in. Lines carry their source's
    label when there are several sources."""
    seen: dict[str, str] = {}
    done = 0
    while rounds is None or done < rounds:
        sources = refresh()
        for source in sources:
            text = _read(source)
            text = text[: text.rfind("\n") + 1]  # a line still being written waits for its end
            new = tail(text, lines) if source.label not in seen else _added(seen[source.label], text)
            seen[source.label] = text
            prefix = f"[{source.label}] " if len(sources) > 1 else ""
            write("".join(f"{prefix}{line}\n" for line in new.splitlines()))
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every)


def _added(old: str, new: str) -> str:
    """What `new` adds to `old`; a console that dropped its start (EC2 keeps the last 64 KB) is
    matched on the end of what was shown."""
    if new.startswith(old):
        return new[len(old):]
    anchor = old[-256:]
    at = new.rfind(anchor) if anchor else -1
    return new[at + len(anchor):] if at >= 0 else new
