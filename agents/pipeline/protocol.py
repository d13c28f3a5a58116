"""The stage requests between SWARM trainers and stage servers, on hivemind's P2P.

Messages are hivemind's own `ExpertRequest` / `ExpertResponse` (tensors plus msgpack metadata),
so nothing new is compiled. One unary handler per stage and operation, named after the cluster
and the stage, so a call to a peer that has moved to another stage fails instead of computing
the wrong layers:

    forward   [input]                 -> [output]
    backward  [input, output gradient] -> [input gradient], or none for an integer input;
              the peer recomputes the forward, so any peer of the stage can take it
    tail      [input, targets]         -> [input gradient], with the loss: the last stage computes
              its forward, loss and backward in one call

Every reply carries the peer's load (microbatches queued there, samples/s it serves), which the
trainer routes by. A microbatch is one message each way: hivemind caps a unary message at 4 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer


class StageOp(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    TAIL = "tail"


class StageUnavailable(RuntimeError):
    """The peer takes no new microbatches (draining, stopped) or could not compute this one."""


def handler_name(cluster: str, stage: int, op: StageOp) -> str:
    return f"{cluster}.stage{stage}.{op.value}"


@dataclass(frozen=True)
class StageReply:
    tensors: tuple[runtime_pb2.Tensor, ...]
    queued: int  # microbatches queued or running at the peer when it replied
    samples_per_second: float  # the stage's forward and backward, as this peer serves them
    loss: float | None = None  # the tail's


def request_message(tensors: Sequence[runtime_pb2.Tensor]) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(tensors=list(tensors))


def reply_message(reply: StageReply) -> runtime_pb2.ExpertResponse:
    metadata = {"queued": reply.queued, "samples_per_second": reply.samples_per_second, "loss": reply.loss}
    return runtime_pb2.ExpertResponse(tensors=list(reply.tensors), metadata=MSGPackSerializer.dumps(metadata))


def parse_reply(message: runtime_pb2.ExpertResponse) -> StageReply:
    """A reply's tensors and load; raises StageUnavailable for one that does not parse."""
    try:
        metadata = MSGPackSerializer.loads(message.metadata)
        loss = metadata["loss"]
        return StageReply(tensors=tuple(message.tensors), queued=max(int(metadata["queued"]), 0),
                          samples_per_second=max(float(metadata["samples_per_second"]), 0.0),
                          loss=None if loss is None else float(loss))
    except (KeyError, TypeError, ValueError) as error:
        raise StageUnavailable(f"malformed stage reply: {error!r}") from None
