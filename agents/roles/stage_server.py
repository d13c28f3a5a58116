"""SWARM stage peer: joins the stage that limits the pipeline, serves it, publishes its record.

Joining (`balance.stage_for_joining`): the peer reads the stage records, names its stage in a
`starting` record stamped with the time it began to join, waits `JOIN_SETTLE_SECONDS` so that
peers started at the same moment see each other's records, and decides again from what it then
reads. Joins count in order of that time, so a fleet launched at once spreads over the stages
instead of every peer picking the first. Then it builds its stage (`pipeline.stage_server.StageServer` on the agent's
own P2P) and refreshes its record every `PUBLISH_SECONDS`. On a drain it refuses new microbatches
at once (trainers retry on the stage's other peers), publishes `draining`, and finishes the
microbatches it holds before the lifecycle leaves.

Not yet: averaging parameters with the stage's other peers, stage checkpoints, moving stages.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from spotrain.agents.log import log
from spotrain.agents.pipeline.balance import stage_for_joining
from spotrain.agents.pipeline.stage_server import StageServer
from spotrain.agents.roles.base import RoleContext
from spotrain.agents.roles.event_loop import EventLoopThread
from spotrain.agents.stage_directory import publish_stage_record, read_stage_records
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState

JOIN_SETTLE_SECONDS = 3.0
PUBLISH_SECONDS = 2.0


@dataclass(frozen=True)
class _Serving:
    context: RoleContext
    loop: EventLoopThread
    server: StageServer


class StageServerRole:
    def __init__(self) -> None:
        self._serving: _Serving | None = None

    def start(self, context: RoleContext) -> None:
        from spotrain.contracts.task import load_pipeline_task

        config = context.config
        task = load_pipeline_task(config.task)
        loop = EventLoopThread("stage-p2p")
        p2p = loop.run(context.dht.replicate_p2p())
        stage = self._join(context, str(p2p.peer_id), task.num_stages)
        server = StageServer(p2p, task, stage, cluster=config.cluster,
                             activations=config.training.compression.activations or "none")
        loop.run(server.start())
        self._serving = _Serving(context, loop, server)
        self._publish()
        log(f"serving stage {stage} of {task.num_stages} as {p2p.peer_id}")

    def _join(self, context: RoleContext, peer_id: str, num_stages: int) -> int:
        dht, cluster, joined_at = context.dht, context.config.cluster, time.time()
        records = read_stage_records(dht, cluster)
        measured = [r.samples_per_second for r in records
                    if r.state == AgentState.TRAINING and r.samples_per_second > 0]
        estimate = statistics.median(measured) if measured else 0.0  # as fast as a typical serving peer
        stage = -1
        for _ in range(2):  # decide, then again once peers that joined at the same moment are visible
            if stage >= 0:
                time.sleep(JOIN_SETTLE_SECONDS)
                records = read_stage_records(dht, cluster)
            stage = stage_for_joining(records, num_stages, peer_id, joined_at)
            publish_stage_record(dht, cluster, StageRecord(stage, peer_id, context.instance_id, estimate, 0,
                                                           AgentState.STARTING, joined_at))
        return stage

    def run_until(self, stop: threading.Event) -> None:
        serving = self._started()
        while not stop.wait(PUBLISH_SECONDS):
            self._publish()
        serving.server.drain()  # a plain flag: new microbatches are refused from now on
        self._publish()
        serving.loop.run(serving.server.stop())  # finishes the microbatches in flight
        log(f"stage {serving.server.stage}: drained after {serving.server.served} microbatch calls")

    def flush_duty(self) -> None:
        """Stage peers hold no checkpoint duty yet: a stage's parameters live on its peers."""

    def shutdown(self) -> None:
        if self._serving is not None:
            self._serving.loop.run(self._serving.server.p2p.shutdown())  # the replica; the DHT's daemon stays
            self._serving.loop.stop()

    def _publish(self) -> None:
        serving = self._started()
        try:
            publish_stage_record(serving.context.dht, serving.context.config.cluster,
                                 serving.server.record(serving.context.instance_id, time.time()))
        except Exception as error:  # a DHT hiccup must not stop serving; the record is refreshed next period
            log(f"stage record not published: {type(error).__name__}: {error}")

    def _started(self) -> _Serving:
        if self._serving is None:
            raise RuntimeError("StageServerRole used before start()")
        return self._serving

