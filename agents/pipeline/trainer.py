"""A SWARM trainer: sends microbatches through one peer per stage, forward then backward.

The trainer holds no layers. It encodes a batch's inputs and targets, relays each stage's
output message to the next stage as it came (never decoded and re-encoded, so an activation is
quantized once) and each gradient back the same way, keeping every stage's input message for
its backward, with the parameter version the forward's peer replied (so that peer recomputes the
forward with the parameters it used). Peers are chosen by `routing.RouteTable`; a failed or
timed-out call is retried on another peer of the stage, a backward on any of them (they recompute
the forward). `train_until` keeps `max_in_flight` microbatches in flight until told to stop (the
agent's trainer role); `train` runs a given number and ends when all of them did (comparisons
sample for sample). Every microbatch ends completed or counted dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from spotrain.agents.admission import NotAdmitted
from spotrain.agents.egress import sent_to
from spotrain.agents.pipeline.protocol import (
    StageOp,
    StageReply,
    StageUnavailable,
    Version,
    handler_name,
    parse_reply,
    request_message,
)
from spotrain.agents.pipeline.routing import RouteTable
from spotrain.contracts.pipeline import PipelineTask
from spotrain.kernels.activations import activation_codec, encode_activation

logger = logging.getLogger("spotrain.agents.pipeline")

# NotAdmitted: a peer whose admission was revoked (its VM preempted) while its stage record lingers in
# the DHT; the call is never made, and the microbatch goes to another peer (it crashed the trainer)
CALL_ERRORS = (asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, StageUnavailable, ConnectionError,
               NotAdmitted)
# a call that finds every peer of its stage full or banned waits until a call to that stage returns, or
# this long (a ban may end, a peer may join); it polled every 50 ms before, waking each waiting lane 20
# times a second on a trainer that may have a few hundredths of a core
WAIT_FOR_PEER_SECONDS = 0.25
NO_PEER_WAIT_SECONDS = 0.5  # poll interval of an idle lane while a stage has no peer


class MicrobatchDropped(RuntimeError):
    pass


@dataclass
class TrainerStats:
    started: int = 0
    completed: int = 0
    dropped: int = 0
    failed_calls: int = 0  # calls retried elsewhere or given up
    losses: list[float] = field(default_factory=list)


class PipelineTrainer:
    def __init__(self, p2p: P2P, task: PipelineTask, stage_peers: Callable[[int], Sequence[PeerID]], *,
                 cluster: str, activations: str = "blockwise8", routes: RouteTable | None = None,
                 max_in_flight: int = 2, call_timeout: float = 10.0, max_attempts: int = 3):
        self.p2p, self.task, self.stage_peers, self.cluster = p2p, task, stage_peers, cluster
        self.codec = activation_codec(activations)
        self.routes = routes or RouteTable()
        self.max_in_flight, self.call_timeout, self.max_attempts = max_in_flight, call_timeout, max_attempts
        self.stats = TrainerStats()
        self._slot_freed: dict[int, asyncio.Condition] = {}  # per stage: a call to it returned

    async def train(self, batches: Iterator[torch.Tensor], microbatches: int) -> TrainerStats:
        """Run `microbatches` microbatches of `batches`, `max_in_flight` at a time."""
        remaining = microbatches

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.microbatch(next(batches))  # a batch is drawn only when a lane is free

        await asyncio.gather(*(lane() for _ in range(self.max_in_flight)))
        return self.stats

    async def train_until(self, batches: Iterator[torch.Tensor], stop: threading.Event) -> TrainerStats:
        """Keep `max_in_flight` microbatches of `batches` in flight until `stop` is set, then finish
        those in flight. Each lane draws its next batch as soon as its microbatch ends: no lane
        waits for the others (batches of rounds that ended together left the trainer idle while a
        round's slowest microbatch finished, longer the longer the peers' queues). A lane draws
        nothing while a stage has no peer at all (it could only be dropped)."""

        async def lane() -> None:
            while not stop.is_set():
                if not self.every_stage_served():
                    await asyncio.sleep(NO_PEER_WAIT_SECONDS)
                    continue
                await self.microbatch(next(batches))

        await asyncio.gather(*(lane() for _ in range(self.max_in_flight)))
        return self.stats

    def every_stage_served(self) -> bool:
        return all(self.stage_peers(stage) for stage in range(self.task.num_stages))

    def take_losses(self) -> list[float]:
        """The losses of the microbatches completed since the last call (call it on the trainer's
        event loop, where they are appended)."""
        losses, self.stats.losses = self.stats.losses, []
        return losses

    async def microbatch(self, batch: torch.Tensor) -> float | None:
        """Forward and backward through the pipeline; the loss, or None when dropped."""
        self.stats.started += 1
        try:
            loss = await self._forward_backward(batch)
        except MicrobatchDropped as error:
            self.stats.dropped += 1
            logger.warning("microbatch dropped: %s", error)
            return None
        self.stats.completed += 1
        self.stats.losses.append(loss)
        return loss

    async def _forward_backward(self, batch: torch.Tensor) -> float:
        inputs, targets = self.task.split_batch(batch)
        tail = self.task.num_stages - 1
        stage_inputs = [encode_activation(inputs, self.codec)]
        forwards: list[tuple[PeerID, StageReply]] = []
        for stage in range(tail):
            peer, reply = await self._call(stage, StageOp.FORWARD, [stage_inputs[-1]])
            forwards.append((peer, reply))
            stage_inputs.append(_single(reply, stage))
        _, reply = await self._call(tail, StageOp.TAIL, [stage_inputs[-1], encode_activation(targets, self.codec)])
        if reply.loss is None:
            raise MicrobatchDropped(f"stage {tail} replied without a loss")
        gradient = _single(reply, tail)
        for stage in reversed(range(tail)):
            peer, forward = forwards[stage]
            _, back = await self._call(stage, StageOp.BACKWARD, [stage_inputs[stage], gradient],
                                       prefer=peer, version=forward.version)
            if stage:
                gradient = _single(back, stage)
        return reply.loss

    async def _call(self, stage: int, op: StageOp, tensors: list[runtime_pb2.Tensor],
                    prefer: PeerID | None = None, version: Version | None = None) -> tuple[PeerID, StageReply]:
        """One stage call, retried on other peers; raises MicrobatchDropped when none answers."""
        request, name = request_message(tensors, version), handler_name(self.cluster, stage, op)
        attempts, waited_since = 0, time.monotonic()
        while attempts < self.max_attempts:
            peers = {str(peer): peer for peer in self.stage_peers(stage)}
            choice = self.routes.choose(stage, list(peers), time.monotonic(),
                                        prefer=str(prefer) if prefer else None)
            if choice is None:
                if self.routes.saturated(stage, list(peers), time.monotonic()):
                    waited_since = time.monotonic()  # the trainer's own lanes fill the stage: wait, do not drop
                elif time.monotonic() - waited_since > self.call_timeout:
                    break
                await self._wait_for_slot(stage)
                continue
            attempts += 1
            self.routes.sent(stage, choice)
            sent_to.add(choice, request.ByteSize())  # activations and gradients are egress too
            try:
                response = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                    peers[choice], name, request, runtime_pb2.ExpertResponse), self.call_timeout)
                reply = parse_reply(response)
            except CALL_ERRORS as error:
                self.routes.failed(stage, choice, time.monotonic())
                await self._free_slot(stage)
                self.stats.failed_calls += 1
                logger.info("stage %d %s at %s failed (%r); retrying elsewhere", stage, op.value, choice, error)
                waited_since = time.monotonic()
                continue
            self.routes.succeeded(stage, choice, reply.samples_per_second, reply.queued, time.monotonic())
            await self._free_slot(stage)
            return peers[choice], reply
        raise MicrobatchDropped(f"stage {stage} {op.value}: no peer answered after {attempts} attempts")

    async def _wait_for_slot(self, stage: int) -> None:
        """Until a call to `stage` returns (one waiter woken per call) or `WAIT_FOR_PEER_SECONDS`."""
        freed = self._slot_freed.setdefault(stage, asyncio.Condition())
        async with freed:
            try:
                await asyncio.wait_for(freed.wait(), WAIT_FOR_PEER_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def _free_slot(self, stage: int) -> None:
        freed = self._slot_freed.get(stage)
        if freed is not None:
            async with freed:
                freed.notify(1)


def _single(reply: StageReply, stage: int) -> runtime_pb2.Tensor:
    if len(reply.tensors) != 1:
        raise MicrobatchDropped(f"stage {stage} replied {len(reply.tensors)} tensors, expected 1")
    return reply.tensors[0]
