"""The SWARM stage records: which peer serves which stage, how fast, how busy.

Every stage server publishes one under `<cluster>.stages` (a subkey per peer, as status records)
and refreshes it within `STAGE_TTL_SECONDS`. Stage servers read them to rebalance, trainers to
find a stage's peers, the controller to report stages and keep two peers on each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from spotrain.contracts.states import AgentState

STAGE_TTL_SECONDS = 30.0
# a stage keeps this many peers: moves never take it below, the controller launches to reach it
MIN_PEERS_PER_STAGE = 2
MAX_DOMAIN_CHARS = 128  # a failure domain's name ("local:us-east", "aws:us-east-1"); longer is malformed


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
    # the failure domain (region) the controller placed the peer in; "" unknown. A newcomer spreads a
    # stage's peers over domains with it; the controller reports domains from its own instance list.
    domain: str = ""

    def to_record(self) -> dict[str, object]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_record(cls, data: object) -> StageRecord | None:
        """Parse a record; None for anything malformed (an old or foreign peer). A record without a
        domain (a peer of an older spotrain) has an unknown one."""
        required = {f.name for f in fields(cls) if f.name != "domain"}
        if not isinstance(data, dict) or not required <= set(data):
            return None
        domain = data.get("domain", "")
        if not isinstance(domain, str) or len(domain) > MAX_DOMAIN_CHARS:
            return None
        try:
            record = cls(stage=int(data["stage"]), peer_id=str(data["peer_id"]),
                         instance_id=str(data["instance_id"]),
                         samples_per_second=float(data["samples_per_second"]), queue=int(data["queue"]),
                         state=AgentState(data["state"]), time=float(data["time"]), domain=domain)
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


def stage_summary(records: Iterable[StageRecord], now: float,
                  domains: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """What the controller reports of each stage: its serving peers and their samples/s together;
    with `domains` (instance id -> failure domain, from the controller's own instance list, not
    from the records, which a peer fills itself) also the sorted domains its peers serve from."""
    peers: dict[int, int] = {}
    speed: dict[int, float] = {}
    where: dict[int, set[str]] = {}
    for record in latest_records(records, now):
        if record.state == AgentState.TRAINING:
            peers[record.stage] = peers.get(record.stage, 0) + 1
            speed[record.stage] = speed.get(record.stage, 0.0) + record.samples_per_second
            if domains is not None and record.instance_id in domains:
                where.setdefault(record.stage, set()).add(domains[record.instance_id])
    summary: list[dict[str, Any]] = [{"stage": stage, "peers": peers[stage], "samples_per_second": speed[stage]}
                                     for stage in sorted(peers)]
    if domains is not None:
        for entry in summary:
            entry["domains"] = sorted(where.get(entry["stage"], ()))
    return summary


def found_stage_records(found: Any) -> list[StageRecord]:
    """The records in what `DHT.get(stages_key(cluster), latest=True)` returned (malformed ones left out)."""
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return []
    parsed = [StageRecord.from_record(getattr(entry, "value", None)) for entry in entries.values()]
    return [record for record in parsed if record is not None]
