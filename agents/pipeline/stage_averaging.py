"""The peers of one SWARM stage average that stage's parameters, and a newcomer downloads them.

Each stage peer steps its own optimizer on its share of the target batch (`stage_compute`; so a
trainer never waits for a stage's peers to agree), and its parameters drift apart from its stage
mates'. So every
peer of a stage runs a hivemind `DecentralizedAverager` under the stage's own prefix
(`<cluster>-stage<i>`: peers of other stages never match with it) and averages its parameters
with whichever mates are matchmaking at the same time, compressed with the spec's state codec.

Averaging works on a snapshot: the snapshot is averaged over the network while the stage keeps
serving, and what the stage learned meanwhile is kept: the parameters move by (average -
snapshot), as local SGD does. An average that is not finite is dropped, never applied.

The averager also serves the stage's live parameters to a peer joining or moving to the stage
(`load_from_peers`), so a replacement takes a live peer's state before any checkpoint. What it
downloads is checked (count, shapes, finite) before it touches the module.

Shutting down (a peer leaving the stage, or moving to another): the averager's process reads
that its last DHT requests were read before it exits. Each request's reply pipe end is fetched
from the sending process when the DHT's process reads it; a process gone by then cannot hand it
over (`agents/dht_requests.py`, where the DHT's process drops such a request instead of dying).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionBase, CompressionInfo, TensorRole

logger = logging.getLogger("spotrain.agents.pipeline")

# the averager's last DHT requests wait this long to be read as it shuts down (hivemind terminates
# an averager still running 5 s after its shutdown began)
FLUSH_SECONDS = 2.0


async def _read_so_far(_dht: DHT, _node: Any) -> bool:
    """Runs in the DHT's process: its pipe is read in order, so every earlier request was read."""
    return True


def stage_prefix(cluster: str, stage: int) -> str:
    """The averaging key prefix of a stage (hivemind forbids dots in it)."""
    return f"{cluster.replace('.', '-')}-stage{stage}"


class StageAverager(DecentralizedAverager):  # type: ignore[misc]  # hivemind is untyped
    def __init__(self, dht: DHT, module: torch.nn.Module, lock: threading.Lock, *, cluster: str, stage: int,
                 steps: Callable[[], int], compression: CompressionBase, state_compression: CompressionBase,
                 matchmaking_time: float, averaging_timeout: float):
        # set before the averager process forks: the host side serves the state from them
        self.module, self.lock, self.stage, self.steps = module, lock, stage, steps
        self.params = [p for p in module.parameters()]
        super().__init__([p.detach().clone() for p in self.params], dht, start=True,
                         prefix=stage_prefix(cluster, stage), min_group_size=2,
                         min_matchmaking_time=matchmaking_time, request_timeout=min(3.0, matchmaking_time),
                         allreduce_timeout=averaging_timeout, compression=compression,
                         state_compression=state_compression, declare_state_period=10.0,
                         tensor_infos=[CompressionInfo.from_tensor(p, key=i, role=TensorRole.PARAMETER)
                                       for i, p in enumerate(self.params)])

    async def _shutdown(self, timeout: float | None) -> None:
        """In the averager's process, last: a round trip through the DHT's request pipe, so that
        the requests this process sent before (group declarations, its download record) were read
        while it could still hand over their reply pipe ends."""
        await super()._shutdown(timeout)
        try:
            await asyncio.wait_for(self.dht.run_coroutine(_read_so_far, return_future=True), FLUSH_SECONDS)
        except Exception as error:  # noqa: BLE001 - a busy DHT: the DHT's process drops what it cannot read
            logger.debug("stage %d: DHT requests not flushed before shutdown: %r", self.stage, error)

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Sequence[CompressionInfo]]:
        """The stage's live parameters (what a moving or new peer downloads), not the last average."""
        with self.lock:
            tensors = [p.detach().clone() for p in self.params]
            steps = self.steps()
        infos = [CompressionInfo.from_tensor(t, key=i, role=TensorRole.PARAMETER) for i, t in enumerate(tensors)]
        return {"stage": self.stage, "steps": steps}, tensors, infos

    def load_from_peers(self, timeout: float) -> int | None:
        """Take a live stage peer's parameters; their step count, or None when none answered usably."""
        try:
            loaded = self.load_state_from_peers(timeout=timeout)
        except Exception as error:  # noqa: BLE001 - a failed download is "none answered"
            logger.warning("stage %d: state download failed: %r", self.stage, error)
            return None
        if loaded is None:
            return None
        metadata, tensors = loaded
        problem = state_refusal(self.stage, self.params, metadata, tensors)
        if problem is not None:
            logger.warning("stage %d: downloaded state refused: %s", self.stage, problem)
            return None
        with self.lock, torch.no_grad():
            for param, tensor in zip(self.params, tensors):
                param.copy_(tensor)
        return int(metadata["steps"])

    def average_once(self, timeout: float) -> bool:
        """One averaging round with the stage's mates; True when an average was applied."""
        with self.lock:
            before = [p.detach().clone() for p in self.params]
        with self.get_tensors() as tensors:
            for tensor, value in zip(tensors, before):
                tensor.copy_(value)
        try:
            group = self.step(timeout=timeout)
        except Exception as error:  # noqa: BLE001 - no group this round (mates busy or gone): try again later
            logger.debug("stage %d: no averaging this round: %r", self.stage, error)
            return False
        if not group:
            return False
        with self.get_tensors() as tensors:
            averaged = [tensor.clone() for tensor in tensors]
        if not all(bool(torch.isfinite(t).all()) for t in averaged):
            logger.warning("stage %d: a non-finite average was dropped", self.stage)
            return False
        with self.lock, torch.no_grad():
            for param, average, old in zip(self.params, averaged, before):
                param.add_(average - old)
        return True


def state_refusal(stage: int, params: Sequence[torch.Tensor], metadata: Any,
                  tensors: Sequence[torch.Tensor]) -> str | None:
    """Why a peer's state must not be loaded into `stage`'s `params`, or None when it fits."""
    if not isinstance(metadata, dict) or metadata.get("stage") != stage:
        return f"metadata {metadata!r} is not of stage {stage}"
    steps = metadata.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return f"bad step count {steps!r}"
    if len(tensors) != len(params):
        return f"{len(tensors)} tensors for {len(params)} parameters"
    for index, (param, tensor) in enumerate(zip(params, tensors)):
        if tensor.shape != param.shape or not tensor.is_floating_point():
            return f"tensor {index}: {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(param.shape)}"
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {index} is not finite"
    return None
