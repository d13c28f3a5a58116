"""The controller as a process: the lock that makes it its cluster's only one, the record by which
`down` recognises it, its start in the background, and the signals that end its run.

The lock file holds "<pid> <start time>", written by the controller itself once it holds the lock;
the start time is field 22 of /proc/<pid>/stat. A process counts as the controller only while the
lock is held and a live process has that pid and that start time, so a stale, empty or forged file,
or a pid the kernel has since given to another process, is never signalled.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spotrain.errors import ControllerRunning, SpotrainError
from spotrain.home import cluster_dir

READY_FD_ENV = "SPOTRAIN_READY_FD"
READY_TIMEOUT_SECONDS = 120.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def lock_path(name: str) -> Path:
    return cluster_dir(name) / "controller.lock"


def process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _verified_pid(record: str) -> int | None:
    parts = record.split()
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None
    pid, started = int(parts[0]), int(parts[1])
    if pid <= 1 or pid == os.getpid():
        return None
    return pid if process_start_time(pid) == started else None


def lock_holder(name: str) -> tuple[bool, int | None]:
    """Whether another process holds the cluster's lock, and the controller's pid when the holder's
    record checks out. Only tests the lock (F_TEST), so a probe never holds it itself."""
    try:
        with open(lock_path(name), "rb") as handle:
            held = _held_by_another(handle.fileno())
            record = handle.read(64).decode("ascii", errors="replace") if held else ""
    except OSError:
        return False, None
    return held, _verified_pid(record) if held else None


def _held_by_another(fd: int) -> bool:
    try:
        os.lockf(fd, os.F_TEST, 0)
    except OSError:
        return True
    return False


def controller_pid(name: str) -> int | None:
    """The pid of the live, verified controller of `name`, or None."""
    return lock_holder(name)[1]


@contextmanager
def controller_lock(name: str, wait_seconds: float = 0.0) -> Iterator[None]:
    """Held for a controller's lifetime; the kernel drops it when the process dies, even by SIGKILL.

    A POSIX record lock (lockf), not flock: hivemind forks helper processes, and an flock would
    be shared with them and outlive the controller."""
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+") as handle:
        os.fchmod(fd, 0o600)  # a file an older spotrain left is world-readable
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise ControllerRunning(lock_refusal(name)) from None
                time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {process_start_time(os.getpid())}\n")
        handle.flush()
        yield


def lock_refusal(name: str) -> str:
    pid = controller_pid(name)
    holder = f"a controller (pid {pid})" if pid else "a process that is not a verified controller"
    return f"{holder} holds {lock_path(name)}; `spotrain down {name}` stops a controller"


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (`down`, `timeout`, a service manager), SIGINT (Ctrl-C) and SIGHUP (a closed terminal;
    left alone under nohup) set `stop`, so the run ends as `down` ends it."""
    previous = {}
    for number in STOP_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, lambda *_: stop.set())
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def tell_parent_ready() -> None:
    """Tell the `launch --detach` that started us that we hold the cluster (no-op in the foreground)."""
    fd = os.environ.pop(READY_FD_ENV, "")
    if not fd.isdigit():
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except OSError:
        pass  # the parent gave up waiting: nothing to tell


def launch_detached(config_path: Path, args: list[str], name: str,
                    timeout: float = READY_TIMEOUT_SECONDS) -> int:
    """Start `spotrain launch` for this spec in the background; its pid once it holds the cluster.

    The child writes "ready" to a pipe once its lock is taken and its run opened. If it exits
    first, its error line (from controller.log) is raised here, so a start that failed is never
    reported as started, and a `down` right after this returns finds the controller."""
    log = cluster_dir(name) / "controller.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    read_fd, write_fd = os.pipe()
    try:
        with open(log, "ab") as handle:
            process = subprocess.Popen([sys.executable, "-m", "spotrain", "launch", str(config_path), *args],
                                       stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, pass_fds=(write_fd,),
                                       env=dict(os.environ, **{READY_FD_ENV: str(write_fd)}))
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        ready = select.select([pipe], [], [], timeout)[0] and pipe.readline().startswith(b"ready")
    if ready:
        return process.pid
    try:
        code = process.wait(timeout=10.0)  # the pipe closed: the child is exiting
    except subprocess.TimeoutExpired:
        raise SpotrainError(f"the controller (pid {process.pid}) did not take cluster {name!r} within "
                            f"{timeout:.0f}s; see {log}") from None
    raise _child_error(log, offset, code)


def _child_error(log: Path, offset: int, code: int) -> SpotrainError:
    """What the child said before it exited: its error lines, else its last line."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line.removeprefix("spotrain: error: ") for line in lines if line.startswith("spotrain: error: ")]
    return SpotrainError("\n".join(errors) if errors else
                         f"the controller exited with code {code}: {lines[-1] if lines else 'no output'} (see {log})")
