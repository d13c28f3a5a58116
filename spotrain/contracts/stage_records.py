"""The SWARM stage records: which peer serves which stage, how fast, how busy.

Every stage server publishes one under `<cluster>.stages` (a subkey per peer, as status records)
and refreshes it within `STAGE_TTL_SECONDS`. Stage servers read them to rebalance, trainers to
find a stage's peers, the controller to report stages and keep two peers on each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from spotrain.contracts.states import AgentState

STAGE_TTL_SECONDS = 30.0
# a stage keeps this many peers: moves never take it below, the controller launches to reach it
MIN_PEERS_PER_STAGE = 2


def stages_key(cluster: str) -> str:
    return f"{cluster}.stages"


@dataclass(frozen=True)
class StageRecord:
    stage: int
    peer_id: str  # the libp2p peer that serves the stage requests
    instance_id: str
    samples_per_second: float  # measured while serving; a starting peer's own estimate
    queue: int  # microbatches waiting or running there
    state: AgentState  # starting: downloading the stage; draining: takes no new microbatches
    time: float

    def to_record(self) -> dict[str, object]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_record(cls, data: object) -> StageRecord | None:
        """Parse a record; None for anything malformed (an old or foreign peer)."""
        if not isinstance(data, dict) or not {f.name for f in fields(cls)} <= set(data):
            return None
        try:
            record = cls(stage=int(data["stage"]), peer_id=str(data["peer_id"]),
                         instance_id=str(data["instance_id"]),
                         samples_per_second=float(data["samples_per_second"]), queue=int(data["queue"]),
                         state=AgentState(data["state"]), time=float(data["time"]))
        except (TypeError, ValueError):
            return None
        valid = record.stage >= 0 and record.samples_per_second >= 0 and record.queue >= 0
        return record if valid and record.samples_per_second < float("inf") else None


def latest_records(records: Iterable[StageRecord], now: float,
                   ttl: float = STAGE_TTL_SECONDS) -> list[StageRecord]:
    """The newest unexpired record of each peer, ordered by stage and peer id."""
    newest: dict[str, StageRecord] = {}
    for record in records:
        if now - record.time <= ttl and (record.peer_id not in newest or record.time > newest[record.peer_id].time):
            newest[record.peer_id] = record
    return sorted(newest.values(), key=lambda r: (r.stage, r.peer_id))


def stage_summary(records: Iterable[StageRecord], now: float) -> list[dict[str, float]]:
    """What the controller reports of each stage: its serving peers and their samples/s together."""
    peers: dict[int, int] = {}
    speed: dict[int, float] = {}
    for record in latest_records(records, now):
        if record.state == AgentState.TRAINING:
            peers[record.stage] = peers.get(record.stage, 0) + 1
            speed[record.stage] = speed.get(record.stage, 0.0) + record.samples_per_second
    return [{"stage": stage, "peers": peers[stage], "samples_per_second": speed[stage]} for stage in sorted(peers)]


def found_stage_records(found: Any) -> list[StageRecord]:
    """The records in what `DHT.get(stages_key(cluster), latest=True)` returned (malformed ones left out)."""
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return []
    parsed = [StageRecord.from_record(getattr(entry, "value", None)) for entry in entries.values()]
    return [record for record in parsed if record is not None]
