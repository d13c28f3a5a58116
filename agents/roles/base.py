"""The contract between the agent's lifecycle and its role."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from spotrain.agents.progress import Progress
from spotrain.contracts.agent_config import AgentConfig

if TYPE_CHECKING:
    from hivemind import DHT

    from spotrain.stores import ManifestSigner, Trust


@dataclass(frozen=True)
class RoleContext:
    """What the lifecycle hands a role once the agent has joined the swarm."""

    config: AgentConfig
    instance_id: str
    dht: DHT
    progress: Progress  # the role's counters, published in the agent's status record
    has_duty: Callable[[], bool]  # the controller asks this agent to write checkpoints
    checkpoint_soon: threading.Event  # a cloud advisory: write the next checkpoint early
    checkpoint_trust: Trust  # which checkpoint manifests to restore from: an admitted peer's (stores/seal.py)
    checkpoint_signer: ManifestSigner | None  # seals the manifests this agent writes; None: no admission
    # seconds a leaving role may still spend (its last upload), None when no drain window is set
    drain_seconds_left: Callable[[], float | None] = lambda: None
    # set when a drain begins: a role on duty writes what it holds at once, not after a step that may
    # never finish (every peer noticed at once leaves an averaging round waiting for the others)
    draining: threading.Event = field(default_factory=threading.Event)


class Role(Protocol):
    """One kind of swarm work. The lifecycle calls the methods in this order, from one thread,
    except that `run_until` returns once `stop` is set (a drain) and may then be abandoned."""

    def start(self, context: RoleContext) -> None:
        """Build what the role needs (model, optimizer, its hivemind processes) and resume."""

    def run_until(self, stop: threading.Event) -> None:
        """Do the work until `stop` is set."""

    def flush_duty(self) -> None:
        """Leaving: write what the checkpoint duty still owes."""

    def shutdown(self) -> None:
        """End the role's hivemind parts (averagers, their processes); the lifecycle ends the DHT."""
