"""No test leaves a process behind: a pytest plugin (loaded by conftest.py).

Every process a test starts carries this session's marker in its environment (set here before any
test runs; children inherit it, and so do hivemind's DHT processes and p2pd daemons even after they
are orphaned to init) or descends from the pytest process. After each test, the processes of ours
that appeared during it and are still alive after a grace period are killed and the test errors,
naming them; at the session's end, any process of ours still alive fails the session the same way.
multiprocessing's and torch's own helpers (resource tracker, forkserver, shared-memory manager)
live as long as pytest does and are not counted.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARKER = "SPOTRAIN_TEST_SESSION"
# a process ending at a test's teardown gets this long to finish ending
GRACE_SECONDS = float(os.environ.get("SPOTRAIN_LEAK_GRACE_SECONDS", "15"))
# helpers that serve the pytest process itself and end with it (torch's shared-memory manager ends
# when its last client does)
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "multiprocessing.semaphore_tracker",
           "torch_shm_manager")
_session = {"marker": b"", "pid": 0}


def pytest_configure(config) -> None:
    token = os.environ[MARKER] = uuid.uuid4().hex  # a pytest run inside a test has its own
    _session["marker"] = f"{MARKER}={token}".encode()
    _session["pid"] = os.getpid()


def _read(proc: Path, name: str) -> bytes:
    try:
        return (proc / name).read_bytes()
    except OSError:
        return b""


def ours() -> dict[int, str]:
    """Live (not zombie) processes of this session but pytest itself: pid -> command line."""
    found: dict[int, str] = {}
    parents: dict[int, int] = {}
    candidates: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == _session["pid"]:
            continue
        stat = _read(proc, "stat").decode(errors="replace")
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) < 2 or fields[0] in ("Z", "X"):
            continue
        pid = int(proc.name)
        parents[pid] = int(fields[1])
        cmdline = _read(proc, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        if any(helper in cmdline for helper in HELPERS):
            continue
        candidates[pid] = cmdline
        if _session["marker"] in _read(proc, "environ").split(b"\0"):
            found[pid] = cmdline
    for pid, cmdline in candidates.items():  # descendants that were given another environment
        ancestor, hops = parents.get(pid, 0), 0
        while ancestor > 1 and hops < 64:
            if ancestor == _session["pid"]:
                found[pid] = cmdline
                break
            ancestor, hops = parents.get(ancestor, 0), hops + 1
    return found


def end_leftovers(before: set[int]) -> dict[int, str]:
    """Wait for processes not in `before` to end; kill the ones that do not and return them."""
    deadline = time.monotonic() + GRACE_SECONDS
    left = {pid: cmd for pid, cmd in ours().items() if pid not in before}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {pid: cmd for pid, cmd in ours().items() if pid not in before}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def describe(left: dict[int, str]) -> str:
    return "; ".join(f"{pid}: {cmd[:160]}" for pid, cmd in sorted(left.items()))


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = set(ours())
    yield
    left = end_leftovers(before)
    if left:
        pytest.fail(f"the test left {len(left)} process(es) running (killed now): {describe(left)}", pytrace=False)


def pytest_sessionfinish(session, exitstatus) -> None:
    left = end_leftovers(set())
    if left:
        print(f"\nprocess leak: {len(left)} process(es) of this test session outlived it (killed now): "
              f"{describe(left)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
