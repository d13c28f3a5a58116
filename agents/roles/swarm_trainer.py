"""SWARM trainer: draws batches and drives them through one peer per stage (`pipeline.trainer`).

It finds the stages' peers in their DHT records (refreshed every `REFRESH_SECONDS` on a thread of
its own, so the pipeline's event loop never waits on the DHT), routes only to peers whose records
say they serve and are fresh (`serving_peers`), and draws no batch while a stage has none. It
keeps `max_in_flight` microbatches in flight and reports the samples completed and their mean loss
in the agent's status every `REPORT_SECONDS`; microbatches that no peer of a stage could take are
counted dropped, in the log. A drain ends after the microbatches in flight (the lifecycle's timer
bounds it).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hivemind.p2p import PeerID

from spotrain.agents.log import log
from spotrain.agents.pipeline.trainer import PipelineTrainer
from spotrain.agents.roles.base import RoleContext
from spotrain.agents.roles.event_loop import EventLoopThread
from spotrain.agents.stage_directory import is_fresh, read_stage_records
from spotrain.contracts.states import AgentState

if TYPE_CHECKING:
    from spotrain.contracts.pipeline import PipelineTask
    from spotrain.contracts.stage_records import StageRecord

REFRESH_SECONDS = 1.0
REPORT_SECONDS = 1.0  # completed samples and their mean loss go into the status this often
DRAIN_CALL_TIMEOUT_SECONDS = 1.0


class StagePeers:
    """The serving peers of each stage, as the DHT's stage records last said."""

    def __init__(self, context: RoleContext):
        self.context = context
        self._by_stage: dict[int, list[PeerID]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage-peers", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def of(self, stage: int) -> list[PeerID]:
        return list(self._by_stage.get(stage, ()))

    def refresh(self) -> None:
        self._by_stage = serving_peers(read_stage_records(self.context.dht, self.context.config.cluster),
                                       time.time())  # replaced whole: the pipeline's thread reads it without a lock

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception as error:  # a DHT hiccup: route by the records we have
                log(f"stage records not read: {type(error).__name__}: {error}")


def serving_peers(records: list[StageRecord], now: float) -> dict[int, list[PeerID]]:
    """Each stage's serving peers: those whose records are fresh (a peer killed without notice
    drops out within FRESH_SECONDS, not the records' 30 s TTL), or, for a stage with no fresh
    record (its peers' refreshes delayed on a loaded host), every peer its records name: a stage
    that looks unserved stops the whole pipeline, a stale peer only costs a retried call."""
    serving = [r for r in records if r.state == AgentState.TRAINING]
    fresh_stages = {r.stage for r in serving if is_fresh(r, now)}
    by_stage: dict[int, list[PeerID]] = {}
    for record in serving:
        if record.stage not in fresh_stages or is_fresh(record, now):
            by_stage.setdefault(record.stage, []).append(PeerID.from_base58(record.peer_id))
    return by_stage


@dataclass
class _Seen:
    """What the log already said."""

    dropped: int = 0
    retried: int = 0


async def _taken(trainer: PipelineTrainer) -> list[float]:
    return trainer.take_losses()  # on the trainer's loop, where losses are appended


@dataclass(frozen=True)
class _Driving:
    context: RoleContext
    task: PipelineTask
    loop: EventLoopThread
    peers: StagePeers
    trainer: PipelineTrainer


class SwarmTrainerRole:
    def __init__(self) -> None:
        self._driving: _Driving | None = None

    def start(self, context: RoleContext) -> None:
        from spotrain.contracts.task import load_pipeline_task

        config = context.config
        if config.pipeline is None:
            raise ValueError("SwarmTrainerRole needs user-data in swarm mode")
        task = load_pipeline_task(config.task)
        loop = EventLoopThread("trainer-p2p")
        p2p = loop.run(context.dht.replicate_p2p())
        peers = StagePeers(context)
        peers.start()
        trainer = PipelineTrainer(p2p, task, peers.of, cluster=config.cluster,
                                  activations=config.training.compression.activations or "none",
                                  max_in_flight=config.pipeline.max_in_flight)
        self._driving = _Driving(context, task, loop, peers, trainer)

    def run_until(self, stop: threading.Event) -> None:
        driving = self._started()
        context, trainer = driving.context, driving.trainer
        batch_size = context.config.training.batch_size
        seed = int(hashlib.sha256(f"{context.instance_id}:{os.getpid()}".encode()).hexdigest()[:8], 16)
        lanes_stop = threading.Event()
        lanes = driving.loop.submit(trainer.train_until(driving.task.batches(seed, batch_size), lanes_stop))
        seen = _Seen()
        try:
            while not lanes.done() and not stop.wait(REPORT_SECONDS):
                self._report(batch_size, seen)
        finally:
            # on a drain the calls still to make wait less for a peer, so the lanes end (what cannot
            # finish counted dropped) within the drain window
            trainer.call_timeout = min(trainer.call_timeout, DRAIN_CALL_TIMEOUT_SECONDS)
            lanes_stop.set()
            lanes.result()  # the microbatches in flight end (or a lane's error is raised here)
        self._report(batch_size, seen)
        log(f"trainer leaving: {trainer.stats.completed} microbatches completed, {trainer.stats.dropped} dropped, "
            f"{trainer.stats.failed_calls} calls retried")

    def _report(self, batch_size: int, seen: _Seen) -> None:
        """The samples and mean loss completed since the last report into the status; drops and
        retries into the log."""
        driving = self._started()
        stats = driving.trainer.stats
        losses = driving.loop.run(_taken(driving.trainer))
        if losses:
            driving.context.progress.record_step(batch_size * len(losses), sum(losses) / len(losses))
        if stats.dropped > seen.dropped:
            log(f"{stats.dropped - seen.dropped} microbatches dropped ({stats.completed} completed so far)")
            seen.dropped = stats.dropped
        if stats.failed_calls > seen.retried:  # examples/check_swarm_demo.py reads this line
            seen.retried = stats.failed_calls
            log(f"stage calls retried on another peer so far: {seen.retried}")

    def flush_duty(self) -> None:
        """A trainer holds no parameters, so no checkpoint duty."""

    def shutdown(self) -> None:
        if self._driving is not None:
            self._driving.peers.stop()
            self._driving.loop.run(self._driving.trainer.p2p.shutdown())  # the replica; the DHT's daemon stays
            self._driving.loop.stop()

    def _started(self) -> _Driving:
        if self._driving is None:
            raise RuntimeError("SwarmTrainerRole used before start()")
        return self._driving
