"""The DHT records through which the controller and the agents meet.

`<cluster>.status`: one signed subkey per agent (the subkey carries the agent's RSA public key,
so hivemind's RSASignatureValidator only accepts that agent's writes). `<cluster>.duty`: the
instance ids the controller asks to write checkpoints.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

STATUS_TTL_SECONDS = 30.0
DUTY_TTL_SECONDS = 60.0


def status_key(cluster: str) -> str:
    return f"{cluster}.status"


def duty_key(cluster: str) -> str:
    return f"{cluster}.duty"


@dataclass(frozen=True)
class AgentStatus:
    instance_id: str
    state: str  # starting | training | draining
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

    def to_record(self) -> dict:
        data = asdict(self)
        data["addresses"] = list(self.addresses)
        return data

    @classmethod
    def from_record(cls, data: object) -> AgentStatus | None:
        """Parse a record; None for anything malformed (an old or foreign peer)."""
        if not isinstance(data, dict):
            return None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not required <= set(data):
            return None
        try:
            values = {name: data[name] for name in names & set(data)}
            values["addresses"] = tuple(str(a) for a in values["addresses"])
            return cls(**values)
        except (TypeError, ValueError):
            return None
