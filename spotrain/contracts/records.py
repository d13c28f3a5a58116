"""The DHT records through which the controller and the agents meet.

`<cluster>.status`: one signed subkey per agent (the subkey carries the agent's RSA public key,
so hivemind's RSASignatureValidator only accepts that agent's writes). `<cluster>.duty`: the
instance ids the controller asks to write checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from spotrain.contracts.states import AgentState

STATUS_TTL_SECONDS = 30.0
DUTY_TTL_SECONDS = 60.0
MAX_EGRESS_DESTINATIONS = 256  # agents.egress keeps 255 peers apart and adds the rest under "other"
MAX_PEER_NAME = 64


def status_key(cluster: str) -> str:
    return f"{cluster}.status"


def duty_key(cluster: str) -> str:
    return f"{cluster}.duty"


@dataclass(frozen=True)
class AgentStatus:
    instance_id: str
    state: AgentState
    epoch: int
    samples: int  # samples this agent has processed since it started
    samples_per_second: float
    loss: float | None
    bytes_sent: int
    bytes_received: int
    checkpoint_epoch: int | None  # the newest epoch this agent wrote to a store
    addresses: tuple[str, ...]
    time: float
    codec_table: str = ""  # spotrain.kernels.codec_table_fingerprint; peers that differ cannot average
    role: str = ""  # swarm mode: "trainer" or "stage"; "" for data parallelism
    # tensor bytes sent per destination peer id since `egress_since` (the agent process's start):
    # cumulative, so the controller charges the growth and a lost record loses nothing
    egress_bytes: dict[str, int] = field(default_factory=dict)
    egress_since: float = 0.0

    def __post_init__(self) -> None:
        egress = self.egress_bytes
        if not isinstance(egress, dict) or len(egress) > MAX_EGRESS_DESTINATIONS or not all(
                isinstance(peer, str) and 0 < len(peer) <= MAX_PEER_NAME and type(count) is int and 0 <= count < 2**62
                for peer, count in egress.items()):
            raise ValueError("egress_bytes must map at most 256 peer ids to byte counts")
        if not isinstance(self.egress_since, (int, float)) or not math.isfinite(self.egress_since):
            raise ValueError("egress_since must be a finite time")

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = AgentState(self.state).value
        data["addresses"] = list(self.addresses)
        data["egress_bytes"] = dict(self.egress_bytes)
        return data

    @classmethod
    def from_record(cls, data: object) -> AgentStatus | None:
        """Parse a record; None for anything malformed (an old or foreign peer, a state we do not know)."""
        if not isinstance(data, dict):
            return None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not required <= set(data):
            return None
        try:
            values = {name: data[name] for name in names & set(data)}
            values["state"] = AgentState(values["state"])
            values["addresses"] = tuple(str(a) for a in values["addresses"])
            return cls(**values)
        except (TypeError, ValueError):
            return None


def newest_statuses(found: Any) -> dict[str, AgentStatus]:
    """instance id -> its newest status, from what `DHT.get(status_key(cluster), latest=True)`
    returned: None, or a value whose `.value` maps each subkey to an entry with a `.value` record."""
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return {}
    newest: dict[str, AgentStatus] = {}
    for entry in entries.values():
        status = AgentStatus.from_record(getattr(entry, "value", None))
        if status is not None and (status.instance_id not in newest or status.time > newest[status.instance_id].time):
            newest[status.instance_id] = status
    return newest


def duty_record(instance_ids: Iterable[str]) -> list[str]:
    """The value stored under `duty_key`: the instance ids on checkpoint duty."""
    return [str(i) for i in instance_ids]


def duty_holders(found: Any) -> Sequence[str]:
    """The instance ids on duty, from what `DHT.get(duty_key(cluster), latest=True)` returned."""
    value = getattr(found, "value", None)
    return tuple(str(i) for i in value) if isinstance(value, list) else ()
