"""The stage requests between SWARM trainers and stage servers, on hivemind's P2P.

Messages are hivemind's own `ExpertRequest` / `ExpertResponse` (tensors plus msgpack metadata),
so nothing new is compiled. One unary handler per stage and operation, named after the cluster
and the stage, so a call to a peer that has moved to another stage fails instead of computing
the wrong layers:

    forward   [input]                 -> [output], with the stage's parameter version
    backward  [input, output gradient] -> [input gradient], or none for an integer input;
              the peer recomputes the forward, so any peer of the stage can take it; the request
              carries the version its forward replied, so that the forward's peer recomputes it
              with the parameters the forward used (`stage_compute`)
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

Version = tuple[int, int]  # a stage peer's (token, optimizer steps): which parameters a forward used


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
    version: Version | None = None  # a forward's: the parameters it used, for its backward


def request_message(tensors: Sequence[runtime_pb2.Tensor], version: Version | None = None) -> runtime_pb2.ExpertRequest:
    metadata = MSGPackSerializer.dumps({"version": list(version)}) if version is not None else b""
    return runtime_pb2.ExpertRequest(tensors=list(tensors), metadata=metadata)


def request_version(message: runtime_pb2.ExpertRequest) -> Version | None:
    """The forward's version a backward request names; raises StageUnavailable for a malformed one."""
    if not message.metadata:
        return None
    try:
        return _version(MSGPackSerializer.loads(message.metadata)["version"])
    except (KeyError, TypeError, ValueError) as error:
        raise StageUnavailable(f"malformed stage request: {error!r}") from None


def _version(value: object) -> Version | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"bad version {value!r}")
    return int(value[0]), int(value[1])


def reply_message(reply: StageReply) -> runtime_pb2.ExpertResponse:
    metadata = {"queued": reply.queued, "samples_per_second": reply.samples_per_second, "loss": reply.loss,
                "version": None if reply.version is None else list(reply.version)}
    return runtime_pb2.ExpertResponse(tensors=list(reply.tensors), metadata=MSGPackSerializer.dumps(metadata))


def parse_reply(message: runtime_pb2.ExpertResponse) -> StageReply:
    """A reply's tensors and load; raises StageUnavailable for one that does not parse."""
    try:
        metadata = MSGPackSerializer.loads(message.metadata)
        loss = metadata["loss"]
        return StageReply(tensors=tuple(message.tensors), queued=max(int(metadata["queued"]), 0),
                          samples_per_second=max(float(metadata["samples_per_second"]), 0.0),
                          loss=None if loss is None else float(loss), version=_version(metadata.get("version")))
    except (KeyError, TypeError, ValueError) as error:
        raise StageUnavailable(f"malformed stage reply: {error!r}") from None
