"""hivemind's DHT, whose process survives a request it cannot unpickle.

Every process forked from the agent (each hivemind averager's process among them) sends requests
to the DHT's process through one pipe, and each request carries an `MPFuture` whose pipe end
travels by `multiprocessing.resource_sharer`: the DHT's process fetches that file descriptor from
the sending process when it unpickles the request. A process that exits with a request still in
the pipe (a stage's averager shut down when its peer moves to another stage, under load, while its
last DHT store waits to be read) can no longer hand it over: the fetch fails with EOFError (the
sender read the fetch, then exited), ConnectionRefusedError or FileNotFoundError (it is gone).
hivemind 1.1.12 catches only OSError there, logs it and stalls its request loop for 3 s; an
EOFError ends the DHT's process, and with it every DHT call of the agent
(`tests/test_dht_requests.py` reproduces both).

Here the DHT's process reads its requests through `RequestPipe`: a request whose parts cannot be
fetched is dropped at once, with a debug line (SPOTRAIN_LOG_LEVEL=debug): nobody waits for its
answer (its sender is gone), so a user has nothing to act on; it happens most at a drain, when
the averagers' processes exit. A request from a live sender never fails this way.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import hivemind

logger = logging.getLogger("spotrain.agents.dht")

# what the DHT's loop runs instead of a request it could not read
DROPPED: tuple[str, list[Any], dict[str, Any]] = ("_dropped_request", [], {})


class RequestPipe:
    """The DHT process's end of its request pipe, as hivemind's loop uses it (fileno, poll, recv)."""

    def __init__(self, connection: Connection):
        self._connection = connection

    def fileno(self) -> int:
        return self._connection.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._connection.poll(timeout)

    def recv(self) -> Any:
        message = self._connection.recv_bytes()  # EOFError here is the pipe's end: every sender is gone
        try:
            return ForkingPickler.loads(message)
        except (EOFError, OSError) as error:  # a part (an MPFuture's pipe end) its sender no longer holds
            logger.debug("a DHT request whose sender is gone was dropped: %s: %s", type(error).__name__, error)
            return DROPPED


class LostRequestSafeDHT(hivemind.DHT):  # type: ignore[misc]  # hivemind is untyped
    """hivemind.DHT whose process drops a request it cannot unpickle instead of dying or stalling."""

    _inner_pipe: Any  # hivemind's attribute: a Connection, then the RequestPipe around it

    def __init__(self, *args: Any, **kwargs: Any):
        start, await_ready = bool(kwargs.pop("start")), bool(kwargs.pop("await_ready", True))  # as hivemind's
        super().__init__(*args, start=False, **kwargs)
        self._inner_pipe = RequestPipe(self._inner_pipe)  # before the fork: the DHT's process reads through it
        if start:
            self.run_in_background(await_ready=await_ready)

    async def _dropped_request(self) -> None:
        """Runs in the DHT's process in place of a request that could not be read."""
