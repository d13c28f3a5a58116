"""The states and reasons the controller, the ledger, the providers and the agents share.

They are `str` enums so they compare equal to, and are stored in SQLite and the DHT as, their
values; code compares members, never the text of a reason. A reason's particulars (an error's
message, an exit code) travel beside it as a plain-text detail.
"""

from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    """A `str` enum that prints as its value, as Python 3.11's StrEnum does (we support 3.10)."""

    def __str__(self) -> str:
        return str.__str__(self)


class InstanceState(TextEnum):
    """A VM's state as the ledger and the providers know it."""

    REQUESTED = "requested"  # written to the ledger, not yet seen running by the provider
    RUNNING = "running"
    PREEMPTED = "preempted"
    TERMINATED = "terminated"
    FAILED = "failed"  # never launched


LIVE_STATES: tuple[InstanceState, ...] = (InstanceState.REQUESTED, InstanceState.RUNNING)


class AgentState(TextEnum):
    """An agent's own state, published in its status record."""

    STARTING = "starting"
    TRAINING = "training"
    DRAINING = "draining"


class LaunchReason(TextEnum):
    """Why the controller asked for (or took over) an instance."""

    INITIAL = "initial"
    REPLACEMENT = "replacement"
    MIGRATION = "migration"
    STAGE_PEERS = "stage peers"  # swarm mode: a stage had fewer than two peers and none on its way
    ADOPTED = "adopted"  # running in the provider but unknown to the ledger (a crash between the two)


class EndReason(TextEnum):
    """Why an instance ended (or why the controller ends one)."""

    SPOT_PREEMPTION = "spot preemption"  # the cloud took it back after a notice
    SPOT_PREEMPTION_WITHOUT_NOTICE = "spot preemption without notice"
    TERMINATED_BY_REQUEST = "terminated by request"  # our terminate call, or a user's
    ENDED_BY_PROVIDER = "ended by the provider"  # any other end a cloud reports; detail: its code or status
    AGENT_FAILED = "agent failed"  # the workload kept crashing; detail: its last exit code
    VM_LOST = "vm lost"  # a local VM's supervisor died
    VANISHED = "vanished from provider"  # the ledger's running instance is no longer listed at all
    NEVER_LAUNCHED = "never launched"  # a request the provider never saw, found when the run ends
    NO_OFFER = "no offer"  # a re-issued request whose offer is gone; detail: the location
    LAUNCH_FAILED = "launch failed"  # detail: the provider's error
    # the controller's reasons to terminate (the ledger records what the provider then reports)
    RETIRED = "retired by the placement policy"
    SURPLUS_STAGE_PEER = "surplus stage peer"  # a stage-peer launch no longer needed (spotrain.stage_fleet)
    RUN_ENDED = "the run ended"
