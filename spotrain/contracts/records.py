"""The DHT records through which the controller and the agents meet.

`<cluster>.status`: one signed subkey per agent: its instance id and its RSA public key's owner
marker, so hivemind's RSASignatureValidator only accepts that key's writes. The key is the
agent's libp2p identity, so its peer id is the key's: a status counts only when the admission
record (spotrain.contracts.admission) lists that peer id for the record's instance id, and when
its time is not ahead of the reader's clock. `<cluster>.duty`: the instance ids on checkpoint
duty, a record signed by the cluster key (`contracts.admission.duty_record`), stored under the
cluster key's owner marker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from spotrain.contracts.admission import MAX_CLOCK_SKEW_SECONDS, owner_public_key, peer_id_of_public_key
from spotrain.contracts.states import AgentState

STATUS_TTL_SECONDS = 30.0
DUTY_TTL_SECONDS = 60.0
MAX_EGRESS_DESTINATIONS = 256  # agents.egress keeps 255 peers apart and adds the rest under "other"
MAX_PEER_NAME = 64
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
    served: int = 0  # swarm mode, stage peers: microbatch calls answered since the agent started
    # tensor bytes sent per destination peer id since `egress_since` (the agent process's start):
    # cumulative, so the controller charges the growth and a lost record loses nothing
    egress_bytes: dict[str, int] = field(default_factory=dict)
    egress_since: float = 0.0
    # peer id -> averaging rounds in which this agent's poison guard dropped that peer's parts
    # (spotrain.kernels.poison_guard); the controller revokes repeat offenders
    offenders: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        egress = self.egress_bytes
        if not isinstance(egress, dict) or len(egress) > MAX_EGRESS_DESTINATIONS or not all(
                isinstance(peer, str) and 0 < len(peer) <= MAX_PEER_NAME and type(count) is int and 0 <= count < 2**62
                for peer, count in egress.items()):
            raise ValueError("egress_bytes must map at most 256 peer ids to byte counts")
        if not isinstance(self.egress_since, (int, float)) or not math.isfinite(self.egress_since):
            raise ValueError("egress_since must be a finite time")
        if not _valid_offenders(self.offenders):
            raise ValueError("offenders must map at most 16 peer ids to counts")

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = AgentState(self.state).value
        data["addresses"] = list(self.addresses)
        data["egress_bytes"] = dict(self.egress_bytes)
        data["offenders"] = dict(self.offenders)
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
            status = cls(**values)
        except (TypeError, ValueError):
            return None
        return status if status._well_typed() else None

    def _well_typed(self) -> bool:
        """Counters are non-negative integers, rates and times finite: a peer's record is input."""
        counters = (self.epoch, self.samples, self.bytes_sent, self.bytes_received, self.served,
                    0 if self.checkpoint_epoch is None else self.checkpoint_epoch)
        reals = (self.samples_per_second, self.time, 0.0 if self.loss is None else self.loss)
        return (all(type(c) is int and c >= 0 for c in counters)
                and all(type(r) in (int, float) and math.isfinite(r) for r in reals)
                and self.samples_per_second >= 0 and isinstance(self.codec_table, str) and isinstance(self.role, str))


def _valid_offenders(value: object) -> bool:
    """At most MAX_OFFENDERS peer ids (short strings), each with a count >= 0."""
    return isinstance(value, dict) and len(value) <= MAX_OFFENDERS and all(
        isinstance(k, str) and 0 < len(k) <= 128 and type(v) is int and v >= 0 for k, v in value.items())


def newest_statuses(found: Any, now: float, admitted: Mapping[str, str] | None) -> dict[str, AgentStatus]:
    """instance id -> its newest status, from what `DHT.get(status_key(cluster), latest=True)`
    returned: None, or a value whose `.value` maps each subkey to an entry with a `.value` record.

    `admitted` (peer id -> instance id, from the admission record): a record counts only when the
    key that signed it (its subkey's owner) is the admitted peer of its instance id. None: an open
    swarm (no admission: the simulator, hand-made test configs). Records timed more than
    MAX_CLOCK_SKEW_SECONDS ahead of `now` never count (they would never go stale)."""
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return {}
    newest: dict[str, AgentStatus] = {}
    for subkey, entry in entries.items():
        status = AgentStatus.from_record(getattr(entry, "value", None))
        if status is None or not status.time <= now + MAX_CLOCK_SKEW_SECONDS:
            continue
        if admitted is not None and admitted.get(signer_peer_id(subkey) or "") != status.instance_id:
            continue
        if status.instance_id not in newest or status.time > newest[status.instance_id].time:
            newest[status.instance_id] = status
    return newest


def signer_peer_id(subkey: object) -> str | None:
    """The peer id of the key whose owner marker a status subkey carries."""
    owner = owner_public_key(subkey)
    return peer_id_of_public_key(owner) if owner is not None else None
