"""The simulator's SWARM mode: stage peers join and move with the agents' own pure functions
(`agents.pipeline.balance`), and the pipeline trains as fast as its slowest stage.

The model: the task's stages cost the same, so a peer serving one stage handles `stages` times
the samples/s its GPU trains the whole model at (`TaskProfile.rate`). A booted stage peer joins
`stage_for_newcomer` (a stage under two peers first, else the limiting one), in launch order;
then `best_move` is applied until it names no move (a real peer checks every
`rebalance_seconds`, well under a simulated tick). The pipeline's pace is `pipeline_throughput`
of those records while a trainer is booted, and nothing without one; the trainers share its
samples, as the real trainers count them. Not modelled: activation transfer time between
stages, a mover's download, and a trainer's own limit on microbatches in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from spotrain.agents.pipeline.balance import best_move, pipeline_throughput, stage_for_newcomer
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState


def peer_id(instance_id: str) -> str:
    """The simulated agent's libp2p peer id (its status record announces it, as a real agent's does)."""
    return f"sim-peer-{instance_id}"


class SimStages:
    """Which booted stage peer serves which stage, kept from one advance to the next."""

    def __init__(self, stages: int):
        self.stages = stages
        self.records: dict[str, StageRecord] = {}  # by instance id

    def update(self, peers: Sequence[tuple[str, float]], now: float) -> None:
        """`peers`: each booted stage peer's (instance id, samples/s on the whole model), oldest
        launch first. Gone peers leave, newcomers join, then the swarm rebalances."""
        present = {instance for instance, _ in peers}
        self.records = {i: replace(r, time=now) for i, r in self.records.items() if i in present}
        for instance, rate in peers:
            if instance not in self.records:
                stage = stage_for_newcomer(list(self.records.values()), self.stages)
                self.records[instance] = StageRecord(stage, peer_id(instance), instance, rate * self.stages, 0,
                                                     AgentState.TRAINING, now)
        for _ in range(len(self.records)):  # each move raises the pace by a third at least: few ever happen
            move = best_move(list(self.records.values()), self.stages)
            if move is None:
                break
            mover = next(i for i, r in self.records.items() if r.peer_id == move.peer_id)
            self.records[mover] = replace(self.records[mover], stage=move.target)

    def pace(self) -> float:
        """The pipeline's samples/s: its slowest stage's."""
        return pipeline_throughput(list(self.records.values()), self.stages)


def swarm_pace(stage_peers: int, rate: float, stages: int) -> float:
    """Samples/s of `stage_peers` peers of one speed spread over the stages as they would join."""
    model = SimStages(stages)
    model.update([(f"peer{index}", rate) for index in range(stage_peers)], 0.0)
    return model.pace()
