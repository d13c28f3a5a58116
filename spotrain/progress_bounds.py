"""What the controller believes of the agents' progress: only what their samples make plausible.

A status record is signed by its instance's admitted peer, but that peer may still lie (a VM whose
identity was stolen, a modified agent). So the controller believes, per instance, a count that
grew by at most `max_rate` samples per second since it last looked (since launch, the first
time), counts an
agent as training only while its accepted samples advance (a stalled or lying agent is not
"training"), and lets the swarm's epoch rise by at most what the accepted samples of all agents
pay for (an epoch is `target_batch_size` samples), plus one per look for rounding. The first
epoch of a run is the lower median of the agents' first claims: with two or more agents, one
liar cannot raise it. A forged epoch of 10^6 then neither ends a run nor reaches the ledger.
A SWARM stage peer trains no samples of its own (its trainers count them): it advances while the
microbatch calls it answered (`served`) grow. That count drives nothing but "training", so it
is not bounded by a rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState

PLAUSIBLE_RATE_FACTOR = 20.0  # an agent may beat the planner's samples/s for its GPU by this much
MIN_PLAUSIBLE_RATE = 1000.0  # samples/s any agent is allowed (the planner's estimate may be far off)
STALL_SECONDS = 60.0  # a "training" agent whose samples did not advance for this long is not training


class ProgressBounds:
    def __init__(self, target_batch_size: int, max_rate: Callable[[str], float], epoch: int | None = None,
                 samples: Mapping[str, int] | None = None):
        self.target_batch_size = target_batch_size
        self.max_rate = max_rate  # instance id -> plausible samples/s
        self.epoch = epoch  # the swarm's epoch as far as it is paid for; None: not known yet
        self.samples = dict(samples or {})  # instance id -> samples accepted
        self._looked: dict[str, float] = {}  # instance id -> when the controller last looked
        self._advanced: dict[str, float] = {}  # instance id -> when its accepted samples (or calls served) last grew
        self._served: dict[str, int] = {}  # instance id -> the stage peer's microbatch calls last seen

    def bound(self, statuses: Mapping[str, AgentStatus], launched_at: Mapping[str, float],
              now: float) -> dict[str, AgentStatus]:
        """The statuses as the controller may believe them: samples and epoch clamped, and TRAINING
        only for agents that advance."""
        gained = 0
        believed: dict[str, AgentStatus] = {}
        for instance, status in statuses.items():
            accepted = self._accept_samples(instance, status, launched_at.get(instance, now), now)
            gained += accepted
            if status.served != self._served.setdefault(instance, status.served):  # a restart counts anew
                self._served[instance] = status.served
                self._advanced[instance] = now
            training = status.state == AgentState.TRAINING and now - self._advanced.get(instance, now) < STALL_SECONDS
            believed[instance] = replace(
                status, samples=self.samples[instance],
                samples_per_second=min(status.samples_per_second, self.max_rate(instance)),
                state=status.state if training or status.state != AgentState.TRAINING else AgentState.STARTING)
        epoch = self._raise_epoch([s.epoch for s in believed.values()], gained)
        return {i: replace(s, epoch=min(s.epoch, epoch)) for i, s in believed.items()}

    def _accept_samples(self, instance: str, status: AgentStatus, launched_at: float, now: float) -> int:
        """Believe the agent's count (samples since it started) up to what its plausible rate allows since
        the last look; returns how many samples that adds (a restarted agent counts anew from 0)."""
        before = self.samples.get(instance, 0)
        since = self._looked.get(instance, launched_at)
        believed = min(status.samples, before + int(self.max_rate(instance) * max(0.0, now - since)))
        self._looked[instance] = now
        self.samples[instance] = believed
        if believed > before or instance not in self._advanced:
            self._advanced[instance] = now
        return max(0, believed - before)

    def _raise_epoch(self, claims: list[int], gained: int) -> int:
        if not claims:
            return self.epoch or 0
        if self.epoch is None:  # the run's first look: what most agents agree on
            self.epoch = sorted(claims)[(len(claims) - 1) // 2]
        else:
            allowed = self.epoch + math.ceil(gained / self.target_batch_size) + 1
            self.epoch = max(self.epoch, min(max(claims), allowed))
        return self.epoch


def plausible_rate(planned: float) -> float:
    """samples/s an agent may claim, from the planner's estimate for its GPU."""
    return max(MIN_PLAUSIBLE_RATE, PLAUSIBLE_RATE_FACTOR * planned)
