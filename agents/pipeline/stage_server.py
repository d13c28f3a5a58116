"""One stage of a PipelineTask, served to SWARM trainers over hivemind's P2P.

Why own handlers and not hivemind.moe's Server: the moe server runs each connection handler in a
forked process beside a batching runtime thread and fixed tensor schemas, its client neither
routes nor retries, and its experts map inputs to outputs, where SWARM's tail computes a loss
from targets. Three unary handlers on the agent's own P2P do what SWARM needs, in one process.

Microbatches run one at a time on one compute thread, so the event loop keeps answering and a
backward never interleaves with another microbatch's optimizer step. A backward recomputes its
forward (no activation is kept between calls: a trainer may send the backward to another peer of
the stage when this one fails) with the parameters its forward used when this peer still has
them, and the optimizer steps once per `step_samples` samples (`stage_compute`). Draining refuses
new microbatches at once, so trainers retry elsewhere, and finishes those already queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from spotrain.agents.egress import sent_to
from spotrain.agents.pipeline.protocol import (
    StageOp,
    StageReply,
    StageUnavailable,
    Version,
    handler_name,
    reply_message,
    request_version,
)
from spotrain.agents.pipeline.stage_compute import NonFiniteLoss, StageCompute
from spotrain.contracts.pipeline import PipelineTask
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState
from spotrain.kernels.activations import activation_codec, decode_activation, encode_activation

logger = logging.getLogger("spotrain.agents.pipeline")

Job = Callable[[list[torch.Tensor], Version | None], tuple[list[torch.Tensor], float | None, Version | None]]


@dataclass
class ThroughputMeter:
    """Seconds per sample of each operation, each a moving average weighted `alpha` on the newest.

    The first `warmup` calls of an operation are not counted (a stage's first call builds what later
    calls reuse: the 2-stage tiny GPT's first head forward took 5.1 ms, the next ones 1.3), and an
    operation counts as measured only after `measured_after` counted calls: the balancer acts on
    the published speeds, and a balanced fleet moved a peer on speeds read as its trainer started
    (docs/architecture.md, rebalancing run 7)."""

    alpha: float = 0.2
    warmup: int = 1
    measured_after: int = 3
    seconds_per_sample: dict[StageOp, float] = field(default_factory=dict)
    calls: dict[StageOp, int] = field(default_factory=dict)

    def add(self, op: StageOp, samples: int, seconds: float) -> None:
        calls = self.calls[op] = self.calls.get(op, 0) + 1
        if calls <= self.warmup:
            return
        value = seconds / max(samples, 1)
        old = self.seconds_per_sample.get(op)
        self.seconds_per_sample[op] = value if old is None else old + self.alpha * (value - old)

    def samples_per_second(self, tail: bool) -> float:
        """Samples through forward and backward per second; 0 until both were measured."""
        ops = (StageOp.TAIL,) if tail else (StageOp.FORWARD, StageOp.BACKWARD)
        if any(self.calls.get(op, 0) < self.warmup + self.measured_after for op in ops):
            return 0.0
        return 1.0 / max(sum(self.seconds_per_sample[op] for op in ops), 1e-9)


class StageServer:
    def __init__(self, p2p: P2P, task: PipelineTask, stage: int, *, cluster: str, activations: str = "blockwise8",
                 estimate: float = 0.0, step_samples: int = 1, domain: str = ""):
        self.p2p, self.task, self.stage, self.cluster = p2p, task, stage, cluster
        self.domain = domain  # this VM's region, named in its records (StageRecord.domain)
        self.estimate = estimate  # samples/s published until this peer measured its own (a joined or moved peer)
        self.tail = task.is_tail(stage)
        self.compute = StageCompute(task, stage, step_samples)
        self.codec = activation_codec(activations)
        self.meter = ThroughputMeter()
        self.state = AgentState.STARTING
        self.queued = 0
        self.served = 0  # microbatch calls answered
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{stage}")
        self._ops: tuple[StageOp, ...] = (StageOp.TAIL,) if self.tail else (StageOp.FORWARD, StageOp.BACKWARD)

    @property
    def module(self) -> torch.nn.Module:
        return self.compute.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.compute.optimizer

    @property
    def lock(self) -> threading.Lock:
        """Held while a microbatch computes and steps, so averaging and checkpoints see whole steps."""
        return self.compute.lock

    @property
    def steps(self) -> int:
        return self.compute.steps

    @steps.setter
    def steps(self, value: int) -> None:  # parameters restored or downloaded
        self.compute.steps = value

    async def start(self) -> None:
        jobs: dict[StageOp, Job] = {StageOp.FORWARD: self._forward, StageOp.BACKWARD: self._backward,
                                    StageOp.TAIL: self._forward_loss_backward}
        for op in self._ops:
            await self.p2p.add_protobuf_handler(handler_name(self.cluster, self.stage, op),
                                                self._handler(op, jobs[op]), runtime_pb2.ExpertRequest)
        self.state = AgentState.TRAINING

    def drain(self) -> None:
        self.state = AgentState.DRAINING

    async def stop(self) -> None:
        """Refuse new microbatches, finish the queued ones, unregister (from a P2P still alive)."""
        self.drain()
        while self.queued:
            await asyncio.sleep(0.01)
        if self.p2p.is_alive:
            for op in self._ops:
                await self.p2p.remove_protobuf_handler(handler_name(self.cluster, self.stage, op))
        self._executor.shutdown(wait=True)

    def record(self, instance_id: str, now: float) -> StageRecord:
        return StageRecord(stage=self.stage, peer_id=str(self.p2p.peer_id), instance_id=instance_id,
                           samples_per_second=self.meter.samples_per_second(self.tail) or self.estimate,
                           queue=self.queued,
                           state=self.state, time=now, domain=self.domain)

    def _handler(self, op: StageOp, job: Job) -> Callable[[runtime_pb2.ExpertRequest, P2PContext],
                                                          Awaitable[runtime_pb2.ExpertResponse]]:
        async def handle(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
            if self.state != AgentState.TRAINING:
                raise StageUnavailable(f"stage {self.stage} peer is {self.state.value}")
            self.queued += 1
            try:
                loop = asyncio.get_running_loop()
                tensors, loss, version = await loop.run_in_executor(self._executor, self._run, op, job, request)
            finally:
                self.queued -= 1
            self.served += 1
            reply = reply_message(StageReply(tensors=tuple(tensors), queued=self.queued, loss=loss, version=version,
                                             samples_per_second=self.meter.samples_per_second(self.tail)))
            sent_to.add(str(context.remote_id), reply.ByteSize())  # egress, charged by the controller
            return reply

        return handle

    def _run(self, op: StageOp, job: Job, request: runtime_pb2.ExpertRequest,
             ) -> tuple[list[runtime_pb2.Tensor], float | None, Version | None]:
        """Decode, compute, encode: all on the compute thread."""
        started = time.perf_counter()
        inputs = [decode_activation(message) for message in request.tensors]
        if not inputs:
            raise StageUnavailable("a stage request without tensors")
        version = request_version(request)
        with self.lock:
            outputs, loss, version = job(inputs, version)
        encoded = [encode_activation(tensor, self.codec) for tensor in outputs]
        self.meter.add(op, inputs[0].shape[0], time.perf_counter() - started)
        return encoded, loss, version

    def _forward(self, inputs: list[torch.Tensor], _: Version | None) -> tuple[list[torch.Tensor], None, Version]:
        output, version = self.compute.forward(inputs[0])
        return [output], None, version

    def _backward(self, inputs: list[torch.Tensor], version: Version | None) -> tuple[list[torch.Tensor], None, None]:
        source, output_grad = _two(inputs)
        grad = self.compute.backward(source, output_grad, version)
        return ([grad] if grad is not None else []), None, None

    def _forward_loss_backward(self, inputs: list[torch.Tensor],
                               _: Version | None) -> tuple[list[torch.Tensor], float, None]:
        source, targets = _two(inputs)
        try:
            grad, loss = self.compute.tail(source, targets)
        except NonFiniteLoss as error:
            raise StageUnavailable(str(error)) from None
        return ([grad] if grad is not None else []), loss, None


def _two(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(inputs) != 2:
        raise StageUnavailable(f"expected 2 tensors, got {len(inputs)}")
    return inputs[0], inputs[1]
