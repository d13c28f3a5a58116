"""The states and reasons the controller, the ledger, the providers and the agents share.

They are `str` enums so they compare equal to, and are stored in SQLite and the DHT as, their
values; code compares members, never the text of a reason.
"""

from __future__ import annotations

from enum import Enum


class InstanceState(str, Enum):
    """A VM's state as the ledger and the providers know it."""

    REQUESTED = "requested"  # written to the ledger, not yet seen running by the provider
    RUNNING = "running"
    PREEMPTED = "preempted"
    TERMINATED = "terminated"
    FAILED = "failed"  # never launched


LIVE_STATES: tuple[InstanceState, ...] = (InstanceState.REQUESTED, InstanceState.RUNNING)


class AgentState(str, Enum):
    """An agent's own state, published in its status record."""

    STARTING = "starting"
    TRAINING = "training"
    DRAINING = "draining"


class LaunchReason(str, Enum):
    """Why the controller asked for (or took over) an instance."""

    INITIAL = "initial"
    REPLACEMENT = "replacement"
    MIGRATION = "migration"
    ADOPTED = "adopted"  # running in the provider but unknown to the ledger (a crash between the two)
