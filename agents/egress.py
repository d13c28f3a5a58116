"""Tensor bytes this agent sends, per destination peer: what the controller charges egress by.

Only the send path is metered here (receive-side checks live elsewhere). Three places send tensors:
- averaging: each `AllReduceRunner` streams our parts to the peer that averages them, and streams
  back the averaged deltas of the parts we average to the peer that sent them;
- state downloads we serve (`DecentralizedAverager.rpc_download_state`);
- swarm mode's activations and their gradients (agents/pipeline/ calls `sent_to.add`).

hivemind runs its averagers in forked child processes, so the counters live in shared memory
created at import, before any fork. Counters are cumulative since `sent_to.since` (this process's
start): a status record that is lost loses nothing, the next one carries the total.
"""

import mmap
import multiprocessing
import struct
import time
from typing import AsyncIterator  # noqa: UP035  hivemind's servicer recognises typing's, not collections.abc's

from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

MAX_PEERS = 255  # destinations kept apart; more than that (a very long run) add up under OTHER
PEER_ID_BYTES = 64  # a base58 libp2p peer id is 46-53 characters
OTHER = "other"  # the destinations past MAX_PEERS; the controller prices them as the dearest path


class PeerBytes:
    """Cumulative bytes per destination peer id, in an anonymous shared mapping (shared with the
    processes forked after it is made). Slots are handed out in order and never reused, so a
    process may remember which slot a peer has.

    Layout: the number of slots used (int64), then slots + 1 keys of PEER_ID_BYTES (the last is
    OTHER's), then slots + 1 int64 counters."""

    def __init__(self, slots: int = MAX_PEERS) -> None:
        self.slots = slots
        self.since = time.time()
        self._counts_at = 8 + (slots + 1) * PEER_ID_BYTES
        self._memory = mmap.mmap(-1, self._counts_at + (slots + 1) * 8)
        self._lock = multiprocessing.Lock()
        self._slot_of: dict[str, int] = {}  # per process: slots this process has looked up

    def add(self, peer: str, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            slot = self._slot(peer)
            self._put(self._counts_at + slot * 8, self._get(self._counts_at + slot * 8) + count)

    def _get(self, offset: int) -> int:
        return int(struct.unpack_from("<q", self._memory, offset)[0])

    def _put(self, offset: int, value: int) -> None:
        struct.pack_into("<q", self._memory, offset, value)

    def _slot(self, peer: str) -> int:
        slot = self._slot_of.get(peer)
        if slot is not None:
            return slot
        key = peer.encode()[:PEER_ID_BYTES]
        used = self._get(0)
        for index in range(used):
            if self._key(index) == key:
                self._slot_of[peer] = index
                return index
        if used >= self.slots:
            return self.slots  # OTHER's slot
        self._memory[8 + used * PEER_ID_BYTES:8 + used * PEER_ID_BYTES + len(key)] = key
        self._put(0, used + 1)
        self._slot_of[peer] = used
        return used

    def _key(self, index: int) -> bytes:
        return self._memory[8 + index * PEER_ID_BYTES:8 + (index + 1) * PEER_ID_BYTES].rstrip(b"\0")

    def snapshot(self) -> dict[str, int]:
        """Peer id -> bytes sent to it since `since`, OTHER for the destinations past the slots."""
        with self._lock:
            counts = {self._key(index).decode(): self._get(self._counts_at + index * 8)
                      for index in range(self._get(0))}
            other = self._get(self._counts_at + self.slots * 8)
        if other:
            counts[OTHER] = other
        return {peer: count for peer, count in counts.items() if count}


sent_to = PeerBytes()


def install() -> None:
    """Meter hivemind's averaging and state serving; idempotent, before any averager starts.

    Subclasses whatever runner class hivemind's averager uses now, so another hook installed the
    same way (on the receive path) composes with this one in either order."""
    from hivemind.averaging import averager

    if not getattr(averager.AllReduceRunner, "_spotrain_egress", False):
        averager.AllReduceRunner = _metered_runner(averager.AllReduceRunner)
    if not getattr(averager.DecentralizedAverager.rpc_download_state, "_spotrain_egress", False):
        averager.DecentralizedAverager.rpc_download_state = _metered_download(
            averager.DecentralizedAverager.rpc_download_state)


def _metered_runner(base: type) -> type:
    class MeteredAllReduceRunner(base):  # type: ignore[valid-type,misc]
        _spotrain_egress = True

        async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
            peer = str(self.ordered_peer_ids[peer_index])
            async for message in super()._generate_input_for_peer(peer_index):
                sent_to.add(peer, message.ByteSize())
                yield message

        async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                     context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
            peer = str(context.remote_id)
            async for message in super().rpc_aggregate_part(stream, context):
                sent_to.add(peer, message.ByteSize())  # the averaged deltas of the parts we average
                yield message

    return MeteredAllReduceRunner


def _metered_download(serve):  # type: ignore[no-untyped-def]
    # ServicerBase reads the handler's argument names and annotations (resolved in this module's
    # globals, so no postponed annotations here): the wrapper spells them out
    async def rpc_download_state(self, _request: averaging_pb2.DownloadRequest,
                                 _context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        peer = str(_context.remote_id)
        async for message in serve(self, _request, _context):
            sent_to.add(peer, message.ByteSize())
            yield message

    rpc_download_state._spotrain_egress = True  # type: ignore[attr-defined]
    return rpc_download_state


__all__ = ["MAX_PEERS", "OTHER", "PeerBytes", "install", "sent_to"]
