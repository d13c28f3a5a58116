"""One log format for the controller and the agents; hivemind routed into it and quieted."""

import asyncio
import concurrent.futures
import gc
import io
import logging
import os
import re
import subprocess
import sys

import pytest

from spotrain.contracts import log_noise
from spotrain.contracts.log_format import add_file, configure

LINE = re.compile(r"^\d\d:\d\d:\d\d [\w.]+: ")


def test_agent_controller_and_hivemind_lines_share_one_format():
    stream = io.StringIO()
    handler = configure(stream, terminal=False)
    try:
        from spotrain.agents.log import log

        log("joined the swarm")
        logging.getLogger("spotrain.controller").info("launched i-1")
        logging.getLogger("spotrain.agents.pipeline").info("stage 0 retried")
        hivemind = logging.getLogger("hivemind.averaging.matchmaking")
        hivemind.info("chatter a user does not need")
        hivemind.warning("It is recommended to use request_timeout smaller than min_matchmaking_time. ...")
        hivemind.warning("averaging failed with a peer")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line[9:] for line in lines] == [
        "agent: joined the swarm", "controller: launched i-1", "pipeline: stage 0 retried",
        "hivemind.averaging.matchmaking: averaging failed with a peer"]
    assert all(LINE.match(line) for line in lines)


def test_configured_twice_still_one_line_per_record():
    stream = io.StringIO()
    configure(stream, terminal=False, route_hivemind=False)
    handler = configure(stream, terminal=False, route_hivemind=False)
    try:
        logging.getLogger("spotrain.controller").info("once")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().count("once") == 1


def test_a_real_hivemind_peer_logs_in_the_agents_format():
    code = ("from spotrain.contracts.log_format import configure; configure(); import hivemind, logging; "
            "logging.getLogger('spotrain.agent').info('up'); "
            "logging.getLogger('hivemind.dht').warning('a warning'); logging.getLogger('hivemind.dht').info('x')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line[9:] for line in lines] == ["agent: up", "hivemind.dht: a warning"], result.stdout


# configure() makes every warning shown a log line: hide libraries' DeprecationWarnings (torch.jit's,
# on hivemind's import) as Python's default filters do outside pytest
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def warnings_back_to_pytest():
    yield
    logging.captureWarnings(False)  # configure() turned it on


@pytest.fixture
def captured(monkeypatch):
    """The one format on a string, at the level SPOTRAIN_LOG_LEVEL gives (the agents' configure())."""
    stream = io.StringIO()
    monkeypatch.setattr(log_noise, "_leaving", False)
    monkeypatch.setattr(log_noise, "_repeats", log_noise.Repeats())
    level = logging.getLogger().level
    handler = configure(stream, terminal=False, route_hivemind=False)
    yield stream
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def unretrieved(coroutine) -> None:
    """Run a task that raises and let nobody retrieve its exception: asyncio reports it when the task is collected."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(coroutine)
        loop.run_until_complete(asyncio.wait([task]))
    finally:
        loop.close()
    del task
    gc.collect()


def destroyed_pending() -> None:
    """A task still waiting when its loop is closed and the task collected (as at a process's end)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(asyncio.sleep(3600))
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()


AVERAGER = """
import asyncio, gc, multiprocessing, sys
from hivemind.utils.mpfuture import MPFuture
from spotrain.contracts.log_format import configure

configure(sys.stdout, terminal=False, route_hivemind=False)
step = MPFuture()  # as an averaging step's control: made by the trainer, its result set by the averager


async def finish_step() -> None:
    step.set_result(1)


def averager() -> None:  # hivemind's averager process: its own loop; the step was cancelled meanwhile
    loop = asyncio.new_event_loop()
    task = loop.create_task(finish_step())
    loop.run_until_complete(asyncio.wait([task]))
    loop.close()
    del task
    gc.collect()  # asyncio reports the task's exception nobody retrieved
    sys.stdout.flush()


step.cancel()
process = multiprocessing.get_context("fork").Process(target=averager)
process.start()
process.join()
print("exit", process.exitcode)
"""


def test_hivemind_setting_a_cancelled_steps_result_is_left_out_unless_debugging():
    result = subprocess.run([sys.executable, "-c", AVERAGER], capture_output=True, text=True, timeout=120)
    assert result.stdout == "exit 0\n", result.stdout + result.stderr
    debug = subprocess.run([sys.executable, "-c", AVERAGER], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "SPOTRAIN_LOG_LEVEL": "debug"})
    assert "asyncio: Task exception was never retrieved" in debug.stdout, debug.stdout + debug.stderr
    assert "InvalidStateError: Can't set_result to a future that is CANCELLED" in debug.stdout  # with its traceback


async def set_result_on_cancelled_future() -> None:
    future = concurrent.futures.Future()
    future.cancel()
    future.set_result(1)  # the same error, raised outside hivemind: a real error


async def boom() -> None:
    raise ValueError("bad value\nsecond line")


def test_an_exception_is_one_line_with_its_type_and_the_traceback_only_when_debugging(captured, monkeypatch):
    log = logging.getLogger("spotrain.controller")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.exception("tick failed")
        log.warning("bad value", exc_info=True)  # hivemind's way: the exception's text as the message
    log.info("first line\n  second line\n")
    lines = captured.getvalue().splitlines()
    assert [line[9:] for line in lines] == ["controller: tick failed: ValueError: bad value",
                                           "controller: bad value (ValueError)", "controller: first line; second line"]
    monkeypatch.setenv("SPOTRAIN_LOG_LEVEL", "debug")
    configure(captured, terminal=False, route_hivemind=False)
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("tick failed")
    assert "Traceback (most recent call last)" in captured.getvalue().split("tick failed: KeyError: 'k'")[1]


def test_other_task_errors_are_one_line_each(captured):
    unretrieved(set_result_on_cancelled_future())  # InvalidStateError raised outside hivemind: a real error
    unretrieved(boom())
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2 and all(LINE.match(line) for line in lines), lines
    assert lines[0][9:].startswith("asyncio: Task exception was never retrieved; future: <Task finished")
    assert lines[0].endswith("exception=InvalidStateError('CANCELLED: <Future at 0x"
                             + lines[0].split("<Future at 0x")[-1]) and lines[0].endswith("> (InvalidStateError)")
    assert lines[1].endswith("ValueError: bad value; second line")


def test_a_pending_task_destroyed_is_one_line_while_training_and_left_out_after_a_clean_drain(captured):
    destroyed_pending()
    (line,) = captured.getvalue().splitlines()
    assert LINE.match(line) and line[9:].startswith("asyncio: Task was destroyed but it is pending!; task: <Task")
    log_noise.leaving()
    destroyed_pending()
    assert captured.getvalue().splitlines() == [line]


def test_a_warning_of_every_averaging_round_is_thinned_with_a_count():
    now = [0.0]
    repeats = log_noise.Repeats(every=60.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("hivemind.averaging.partition", logging.WARNING, "", 0, message, (), None)

    kept = []
    half, most = "Reducer: received 50.0% of input tensors", "Reducer: received 75.0% of input tensors"
    for at, message in ((0, half), (10, half), (20, most), (30, "averaging failed"), (61, half), (62, half)):
        now[0] = at
        one = record(message)
        if repeats.keep(one):
            kept.append(one.getMessage())
    assert kept == ["Reducer: received 50.0% of input tensors", "averaging failed",
                    "Reducer: received 50.0% of input tensors (2 more like it in the last 60s)"]


def test_google_auth_looking_for_credentials_is_quiet(captured):
    # a Compute client made before logging was configured: google-api-core cut "google" off the root
    logging.getLogger("google").propagate = False
    handler = configure(captured, terminal=False, route_hivemind=False)  # what `spotrain launch` does next
    try:
        logging.getLogger("google.auth._default").warning(
            "Authentication failed using Compute Engine authentication due to unavailable metadata server.")
        logging.getLogger("google.auth._default").error("a real failure")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [line[9:] for line in captured.getvalue().splitlines()] == ["google.auth._default: a real failure"]


def test_a_held_log_file_is_written_only_once_told(tmp_path, captured):
    path = tmp_path / "cluster" / "controller.log"
    handler = add_file(str(path), held=True)
    try:
        logging.getLogger("spotrain.controller").info("launched i-1")
        assert not path.parent.exists()  # a launch refused now leaves nothing behind
        handler.start_writing()
        logging.getLogger("spotrain.controller").info("launched i-2")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    lines = [line[9:] for line in path.read_text().splitlines()]
    assert lines == ["controller: launched i-1", "controller: launched i-2"]
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
