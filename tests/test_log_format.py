"""One log format for the controller and the agents; hivemind routed into it and quieted."""

import io
import logging
import re
import subprocess
import sys

from spotrain.contracts.log_format import configure

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
