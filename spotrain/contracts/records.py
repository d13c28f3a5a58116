"""The DHT records through which the controller and the agents meet.

`<cluster>.status`: one signed subkey per agent (the subkey carries the agent's RSA public key,
so hivemind's RSASignatureValidator only accepts that agent's writes). `<cluster>.duty`: the
instance ids the controller asks to write checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from spotrain.contracts.states import AgentState

STATUS_TTL_SECONDS = 30.0
DUTY_TTL_SECONDS = 60.0
MAX_OFFENDERS = 16  # peer ids an agent reports offences of (its poison guard keeps as many)


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
    # peer id -> averaging rounds in which this agent's poison guard dropped that peer's parts
    # (spotrain.kernels.poison_guard); the controller revokes repeat offenders
    offenders: Mapping[str, int] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = AgentState(self.state).value
        data["addresses"] = list(self.addresses)
        data["offenders"] = dict(self.offenders)
        return data

    @classmethod
    def from_record(cls, data: object) -> AgentStatus | None:
        """Parse a record; None for anything malformed (an old or foreign peer, a state we do not know)."""
        if not isinstance(data, dict):
            return None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not required <= set(data):
            return None
        try:
            values = {name: data[name] for name in names & set(data)}
            values["state"] = AgentState(values["state"])
            values["addresses"] = tuple(str(a) for a in values["addresses"])
            if "offenders" in values and not _valid_offenders(values["offenders"]):
                return None
            return cls(**values)
        except (TypeError, ValueError):
            return None


def _valid_offenders(value: object) -> bool:
    """At most MAX_OFFENDERS peer ids (short strings), each with a count >= 0."""
    return isinstance(value, dict) and len(value) <= MAX_OFFENDERS and all(
        isinstance(k, str) and 0 < len(k) <= 128 and type(v) is int and v >= 0 for k, v in value.items())


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
