"""A DHT request whose sender can no longer hand over its pipe end (the sender process exiting, as a
stage's averager does when its peer moves) must not end the agent's DHT process.

Real hivemind DHTs in forked processes; the DHT's loop is held on a gate so that the sender's
request is read only after the sender let go of its pipe end (no timing)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing import resource_sharer

import hivemind
import pytest
from hivemind.utils import get_dht_time

from spotrain.agents.dht_requests import LostRequestSafeDHT

GATE = mp.Event()  # created before any DHT forks: its process inherits it


async def _hold_loop(_dht: hivemind.DHT, _node: object) -> bool:
    """Runs in the DHT's process and blocks its loop (a synchronous wait) until the gate opens."""
    return GATE.wait(60)


def _send_and_let_go(dht: hivemind.DHT, sent: mp.Event, done: mp.Event, how: str) -> None:
    dht.store("lost", b"v", get_dht_time() + 30, return_future=True)
    if how == "exit":
        sent.set()
        return  # the process exits: its listener socket is removed with it
    resource_sharer._resource_sharer._cache.clear()  # still listening, no longer holding the pipe end
    sent.set()
    done.wait(60)


@contextlib.contextmanager
def _a_lost_request(dht: hivemind.DHT, how: str) -> Iterator[None]:
    """The DHT reads a request whose sender let go of its pipe end; the sender stays as it is (alive
    without the pipe end, or exited) until the block ends, so that the outcome is the DHT's alone."""
    GATE.clear()
    held = dht.run_coroutine(_hold_loop, return_future=True)
    sent, done = mp.Event(), mp.Event()
    sender = mp.Process(target=_send_and_let_go, args=(dht, sent, done, how))
    sender.start()
    try:
        assert sent.wait(60)
        if how == "exit":
            sender.join(60)
        GATE.set()  # the DHT reads the sender's request now
        assert held.result(timeout=30)
        yield
    finally:
        done.set()
        sender.join(60)


def test_hivemind_dht_dies_of_a_request_whose_pipe_end_is_gone():
    """The cause, on hivemind's own DHT: EOFError while unpickling the request ends its process."""
    dht = hivemind.DHT(start=True)
    try:
        with _a_lost_request(dht, "let_go"):
            dht.join(timeout=30)
            assert not dht.is_alive()
    finally:
        if dht.is_alive():
            dht.shutdown()


@pytest.mark.parametrize("how", ["let_go", "exit"])
def test_a_lost_request_is_dropped_and_the_dht_keeps_answering(how):
    dht = LostRequestSafeDHT(start=True)
    try:
        with _a_lost_request(dht, how):
            # these requests are read after the lost one (one pipe, in order): answered means it survived
            assert dht.store("kept", b"v", get_dht_time() + 30, return_future=True).result(timeout=30)
            found = dht.get("kept", latest=True, return_future=True).result(timeout=30)
            assert found is not None and found.value == b"v"
            lost = dht.get("lost", latest=True, return_future=True).result(timeout=30)
            assert lost is None  # the lost request was dropped, not half-run
            assert dht.is_alive()
    finally:
        dht.shutdown()
