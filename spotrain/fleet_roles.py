"""Each live instance's role, as `spotrain status` shows it.

Data parallelism: every instance trains; the first `placement.workers` live ones (in launch order,
as the placement policy counted them when it chose their offers) are workers, the later ones
backups (the policy put them in a failure domain no worker uses, so a lost worker leaves the fleet
its size). When a worker ends, the oldest backup takes its place in the count. A draining agent is
leaving: its replacement is already counted.

Swarm mode: the controller names a VM's role (trainer or stage peer) in its user-data and reads
from the stage records which stage a stage peer serves; it writes the labels to the ledger as a
`roles` event when they change, since `status` runs in another process and cannot read the DHT.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState
from spotrain.ledger import InstanceRow, Ledger, Run

ROLES_EVENT = "roles"
MAX_LABEL_CHARS = 32  # "stage 12", "trainer": anything longer did not come from this code


def swarm_labels(live: Iterable[str], named: Mapping[str, str], records: Iterable[StageRecord]) -> dict[str, str]:
    """The controller's side: instance id -> "trainer", "stage N" (the stage its newest record
    serves) or "stage peer" (named a stage peer, serving no stage yet); unknown roles left out."""
    serving = {r.instance_id: r.stage for r in records}
    labels = {}
    for instance_id in live:
        if named.get(instance_id) == "trainer":
            labels[instance_id] = "trainer"
        elif instance_id in serving:
            labels[instance_id] = f"stage {serving[instance_id]}"
        elif named.get(instance_id) == "stage":
            labels[instance_id] = "stage peer"
    return labels


def recorded_swarm_labels(ledger: Ledger, run: Run) -> dict[str, str]:
    """The newest `roles` event's labels; a malformed one (the ledger is input too) counts as none."""
    events = ledger.events(run.id, kinds=(ROLES_EVENT,))
    if not events:
        return {}
    try:
        labels = json.loads(events[-1]["detail"])
    except ValueError:
        return {}
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_LABEL_CHARS}


def roles(rows: list[InstanceRow], agent_states: Mapping[str, str | None], workers: int,
          swarm: Mapping[str, str] | None) -> dict[str, str]:
    """request id -> role of each live row (`rows` in launch order); `swarm`: the recorded swarm
    labels in swarm mode, None in data-parallel mode."""
    out: dict[str, str] = {}
    counted = 0
    for row in rows:
        if swarm is not None:
            out[row.request_id] = swarm.get(row.instance_id or "", "-")
        elif agent_states.get(row.instance_id or "") == AgentState.DRAINING:
            out[row.request_id] = "leaving"
        else:
            out[row.request_id] = "worker" if counted < workers else "backup"
            counted += 1
    return out
