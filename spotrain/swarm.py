"""What the control loop needs of the training swarm, live (swarm_view.SwarmView, a DHT peer) or
simulated (the simulator's swarm)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.stage_records import StageRecord


class Swarm(Protocol):
    def statuses(self) -> dict[str, AgentStatus]:
        """The newest unexpired status of every agent, by instance id."""
        ...

    def addresses(self) -> list[str]:
        """Where a new agent can join the swarm (multiaddrs)."""
        ...

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        """Publish which agents write the checkpoints."""
        ...

    def stage_records(self) -> list[StageRecord]:
        """Swarm mode: the stage peers' records (`<cluster>.stages`), unexpired ones at least."""
        ...


class NoSwarm:
    """The swarm as `spotrain down` sees it: it ends a run without joining the DHT, so it hears no agent."""

    def statuses(self) -> dict[str, AgentStatus]:
        return {}

    def addresses(self) -> list[str]:
        return []

    def assign_duty(self, instance_ids: Sequence[str]) -> None:
        pass

    def stage_records(self) -> list[StageRecord]:
        return []
