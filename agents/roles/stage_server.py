"""SWARM stage peer: joins the stage that limits the pipeline, serves it, averages it with the
stage's other peers, checkpoints it when on duty, and moves to another stage when that raises
the pipeline's throughput enough.

Joining (`balance.stage_for_joining`): a peer that started the swarm alone first waits until it has
merged with another (agents booted together behind a NAT'd controller start alone, and each then
saw no record and chose the same stage); then it reads the stage records, names its stage in a
`starting` record stamped with the time it began to join, waits `JOIN_SETTLE_SECONDS` so that
peers started at the same moment see each other's records, and decides again from what it then
reads. Joins count in order of that time, so a fleet launched at once spreads over the stages.

Entering a stage (`_enter`): the stage's parameters come from a live peer of the stage first
(its averager serves them), from the newest valid stage checkpoint in the stores otherwise, and
are the task's initial weights only when neither exists.

While serving: the peer steps its optimizer once per its share of `target_batch_size` (the target
over the stage's serving peers, as data-parallel peers share a global batch); the record is
refreshed every `PUBLISH_SECONDS`, and the share with it; an averaging thread averages the
stage with its mates round after round and, every `every_epochs` rounds, writes a stage checkpoint
if this peer holds the stage's duty; every `rebalance_seconds` (jittered), and at every refresh for
a period after a serving peer is lost (`balance.MoveChecks`), the peer runs
`balance.should_move` on the records and, when the move is its own, announces it (a `starting`
record at the target, so that no second peer leaves the old stage meanwhile), reads the records
again a refresh later and stays if a peer that goes first announced a move to the same stage
meanwhile (`balance.concurrent_movers`), downloads the
target stage's parameters from that stage's peers, and only then serves the new stage (its
record published at once) and stops serving its old one (finishing the microbatches it holds).
A move that fails on the way (no download, the new stage not built or not started) leaves the
peer serving its old stage; once the new stage serves, whatever happens to the old one, the
peer serves the new one. A peer that moved does not move again for `balance.MOVE_HOLD_PERIODS`
periods unless a serving peer is lost meanwhile (`balance.may_move_again`).

On a drain it refuses new microbatches at once (trainers retry on the stage's other peers),
publishes `draining` (the stage's next peer takes the checkpoint duty from that record), finishes
the microbatches it holds and, if it held the duty, writes the stage's last checkpoint.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spotrain.agents.log import log
from spotrain.agents.pipeline.balance import (
    Move,
    MoveChecks,
    concurrent_movers,
    may_move_again,
    measured_stage_costs,
    should_move,
    stage_for_joining,
)
from spotrain.agents.pipeline.stage_averaging import StageAverager
from spotrain.agents.pipeline.stage_checkpoints import StageCheckpoints, stage_duty_holders
from spotrain.agents.pipeline.stage_compute import step_samples_per_peer
from spotrain.agents.pipeline.stage_server import StageServer
from spotrain.agents.roles.base import RoleContext
from spotrain.agents.roles.event_loop import EventLoopThread
from spotrain.agents.stage_directory import (
    FRESH_SECONDS,
    PUBLISH_SECONDS,
    is_fresh,
    publish_stage_record,
    read_stage_records,
    wait_for_another_peer,
)
from spotrain.contracts.pipeline import PipelineTask
from spotrain.contracts.stage_records import StageRecord, latest_records
from spotrain.contracts.states import AgentState

if TYPE_CHECKING:
    from hivemind import DHT

JOIN_SETTLE_SECONDS = 3.0
# a stage peer that started the swarm alone waits this long for the others to merge before it
# chooses (a pipeline always has other peers; several MERGE_SECONDS: the controller publishes first)
ALONE_WAIT_SECONDS = 60.0
REBALANCE_JITTER = 0.2
MOVE_DOWNLOAD_ATTEMPTS = 3  # a move's target stage has live peers (their records say so): worth retrying
DOWNLOAD_RETRY_SECONDS = 2.0
CLOSE_SECONDS = 30.0  # the last checkpoint's upload when no drain window says otherwise


def records_for_joining(dht: DHT, cluster: str) -> list[StageRecord]:
    """The stage records a newcomer decides on: a serving peer's only while fresh (it refreshes its
    record every PUBLISH_SECONDS; one killed without notice keeps a `training` record in the DHT for
    STAGE_TTL_SECONDS, and a replacement then joined a stage of three while the killed peer's stage
    had one); a joining peer's `starting` record keeps its join time, so it counts for the whole TTL."""
    now = time.time()
    return [r for r in read_stage_records(dht, cluster) if is_fresh(r, now)]


@dataclass(frozen=True)
class _Stage:
    """One stage as this peer serves it."""

    server: StageServer
    averager: StageAverager
    checkpoints: StageCheckpoints


class StageServerRole:
    def __init__(self) -> None:
        self._context: RoleContext | None = None
        self._task: PipelineTask | None = None
        self._loop: EventLoopThread | None = None
        self._stage: _Stage | None = None
        self._records: list[StageRecord] = []
        self._records_before_drain: list[StageRecord] = []  # who held duty when the drain began
        self._switch = threading.Lock()  # an averaging round or a stage move, never both
        self._leaving = threading.Event()
        self._moving = threading.Event()  # a move waits for the switch lock: averaging rounds give way
        self._averaging: threading.Thread | None = None
        self.moves = 0
        self._moved_at: float | None = None  # monotonic time of the last move (`may_move_again`)
        self._served_before = 0  # microbatch calls answered on the stages this peer left

    def start(self, context: RoleContext) -> None:
        from spotrain.contracts.task import load_pipeline_task

        self._context, self._task = context, load_pipeline_task(context.config.task)
        self._loop = loop = EventLoopThread("stage-p2p")
        stage, estimate = self._join(str(context.dht.peer_id), self._task.num_stages)
        entered = self._enter(stage, estimate, moving=False)
        if entered is None:
            raise RuntimeError(f"stage {stage}: could not enter")  # a fresh start cannot fail to download
        loop.run(entered.server.start())
        self._stage = entered
        self._publish()
        self._averaging = threading.Thread(target=self._average_rounds, name="stage-averaging", daemon=True)
        self._averaging.start()
        log(f"serving stage {stage} of {self._task.num_stages} as {context.dht.peer_id}")

    def _join(self, peer_id: str, num_stages: int) -> tuple[int, float]:
        context = self._started_context()
        dht, cluster = context.dht, context.config.cluster
        waited = wait_for_another_peer(dht, ALONE_WAIT_SECONDS)
        if waited is None:
            log(f"no other peer in the swarm after {ALONE_WAIT_SECONDS:.0f}s: choosing a stage alone")
        elif waited >= 1.0:
            log(f"waited {waited:.0f}s for the swarm to merge before choosing a stage")
        joined_at = time.time()
        records = records_for_joining(dht, cluster)
        measured = [r.samples_per_second for r in records
                    if r.state == AgentState.TRAINING and r.samples_per_second > 0]
        estimate = statistics.median(measured) if measured else 0.0  # as fast as a typical serving peer
        stage = -1
        for _ in range(2):  # decide, then again once peers that joined at the same moment are visible
            if stage >= 0:
                time.sleep(JOIN_SETTLE_SECONDS)
                records = records_for_joining(dht, cluster)
            stage = stage_for_joining(records, num_stages, peer_id, joined_at, self._domain())
            publish_stage_record(dht, cluster, StageRecord(stage, peer_id, context.instance_id, estimate, 0,
                                                           AgentState.STARTING, joined_at, self._domain()))
        return stage, estimate

    def _enter(self, stage: int, estimate: float, *, moving: bool) -> _Stage | None:
        """Build `stage` with its parameters from a live peer, else (not when moving) the stores."""
        context, task, loop = self._started_context(), self._started_task(), self._started_loop()
        config = context.config
        from spotrain.kernels import StateCodec

        p2p = loop.run(context.dht.replicate_p2p())
        server = StageServer(p2p, task, stage, cluster=config.cluster, estimate=estimate,
                             activations=config.training.compression.activations or "none",
                             step_samples=self._step_samples(stage, joining=1), domain=self._domain())
        state = config.training.compression.state
        averager = StageAverager(context.dht, server.module, server.lock, cluster=config.cluster, stage=stage,
                                 steps=lambda: server.steps, compression=StateCodec(state),
                                 state_compression=StateCodec(state, download=True),
                                 matchmaking_time=config.training.matchmaking_time,
                                 averaging_timeout=config.training.averaging_timeout)
        checkpoints = StageCheckpoints(config.checkpoint, server, f"{context.instance_id}-stage{stage}",
                                       context.checkpoint_trust, context.checkpoint_signer)
        steps = self._download(averager, attempts=MOVE_DOWNLOAD_ATTEMPTS if moving else 1)
        if steps is not None:
            server.steps = steps
            log(f"stage {stage}: parameters downloaded from a live peer (step {steps})")
        elif moving:
            log(f"stage {stage}: no peer of the stage served its parameters: not moving")
            averager.shutdown()
            checkpoints.close(0.0)
            return None
        elif (loaded := checkpoints.restore()) is not None:
            log(f"stage {stage}: restored step {loaded.epoch} from {loaded.store_url}")
        else:
            log(f"stage {stage}: no live peer and no checkpoint: starting from the task's weights")
        return _Stage(server, averager, checkpoints)

    def _download(self, averager: StageAverager, attempts: int) -> int | None:
        """The stage's live parameters (their step count), trying `attempts` times: a move at load
        25 once found no peer to download from at once (likely the DHT entry where a stage's peers
        declare themselves for download, which hivemind lets lapse for a moment at each renewal)."""
        timeout = self._started_context().config.training.averaging_timeout
        for attempt in range(attempts):
            if attempt:
                time.sleep(DOWNLOAD_RETRY_SECONDS)
            steps = averager.load_from_peers(timeout=timeout)
            if steps is not None:
                return steps
        return None

    def run_until(self, stop: threading.Event) -> None:
        pipeline = self._started_context().config.pipeline
        seconds = pipeline.rebalance_seconds if pipeline is not None else 30.0
        rebalance = pipeline is None or pipeline.rebalance
        checks = MoveChecks.from_now(seconds, time.monotonic(), random.random(), REBALANCE_JITTER)
        serving_peers = self._serving_peers()
        while not stop.wait(PUBLISH_SECONDS):
            self._publish()
            # lost: gone from the fresh records, or draining; a peer that announced a move (`starting` at
            # its target) is not lost (counted so, every move set all peers checking, and noisy speeds
            # then drew a second and a third move in a balanced fleet)
            serving_before, serving_peers = serving_peers, self._serving_peers()
            now = time.monotonic()
            if rebalance and checks.due(now, serving_before, self._present_peers(), random.random()) \
                    and not stop.is_set():
                self._maybe_move(seconds, after_loss=checks.after_loss(now))
        serving = self._started_stage()
        serving.server.drain()  # a plain flag: new microbatches are refused from now on
        serving.averager.allow_state_sharing = False  # newcomers download from the peers that stay
        self._publish()
        self._started_loop().run(serving.server.stop())  # finishes the microbatches in flight
        log(f"stage {serving.server.stage}: drained after {serving.server.served} microbatch calls")

    def _maybe_move(self, period: float, *, after_loss: bool) -> None:
        serving, task = self._started_stage(), self._started_task()
        records = self._records
        costs = measured_stage_costs(records, task.num_stages)
        move = should_move(records, task.num_stages, str(serving.server.p2p.peer_id), stage_costs=costs)
        if move is None:
            return
        if not may_move_again(self._moved_at, time.monotonic(), period, after_loss=after_loss):
            log(f"not moving to stage {move.target} yet: moved {time.monotonic() - (self._moved_at or 0):.0f} s "
                f"ago, no peer lost since (predicted {move.throughput_before:.2f} -> {move.throughput_after:.2f})")
            return  # best_move names this peer, so the others do not move either
        estimate = serving.server.record("", 0.0).samples_per_second * costs[move.source] / costs[move.target]
        log(f"moving from stage {move.source} to {move.target}: predicted pipeline "
            f"{move.throughput_before:.2f} -> {move.throughput_after:.2f} samples/s")
        announced = threading.Event()  # set when the move is done or given up
        announcing = threading.Thread(target=self._keep_announcing, args=(move.target, estimate, announced),
                                      name="move-announcement", daemon=True)
        announcing.start()
        try:
            entered = self._enter(move.target, estimate, moving=True) if self._claim(move, records) else None
        except Exception as error:  # a move that fails leaves the peer serving its stage
            log(f"stage {move.target}: could not be entered ({type(error).__name__}: {error}): not moving")
            entered = None
        finally:
            announced.set()
            announcing.join(timeout=PUBLISH_SECONDS + 5)
        if entered is None:
            self._publish()  # serving the old stage after all
            return
        self._moving.set()
        try:
            with self._switch:
                self._switch_to(entered)
        finally:
            self._moving.clear()
        self._publish()

    def _switch_to(self, entered: _Stage) -> None:
        """Serve `entered` (its record published: trainers route to it now), then leave the old
        stage; if `entered` does not start, the old one serves on. The new stage serves first, so
        that no failure on the way leaves the peer serving nothing."""
        loop, old = self._started_loop(), self._started_stage()
        try:
            loop.run(entered.server.start())
        except Exception as error:
            log(f"stage {entered.server.stage}: could not be served ({type(error).__name__}: {error}): not moving")
            self._abandon(entered)
            return
        write = self._on_duty(old)  # by the records before this peer's record names the new stage
        self._stage = entered
        self.moves += 1
        self._moved_at = time.monotonic()
        self._publish()
        log(f"now serving stage {entered.server.stage} (move {self.moves})")
        try:
            self._leave_stage(old, write=write)
        except Exception as error:  # the new stage serves whatever became of the old one
            log(f"stage {old.server.stage}: not left cleanly ({type(error).__name__}: {error})")
        self._served_before += old.server.served  # the status counts every stage served

    def _abandon(self, entered: _Stage) -> None:
        """A stage built for a move that did not happen: its averager and checkpoint writer end."""
        try:
            self._started_loop().run(entered.server.stop())
            entered.averager.shutdown()
            entered.checkpoints.close(0.0)
        except Exception as error:  # noqa: BLE001 - the old stage serves on regardless
            log(f"stage {entered.server.stage}: not abandoned cleanly ({type(error).__name__}: {error})")

    def _claim(self, move: Move, decided_on: list[StageRecord]) -> bool:
        """After announcing `move`: a refresh later, read the records again; False (stay) when a peer
        that goes first announced a move to the same stage meanwhile (`balance.concurrent_movers`)."""
        context = self._started_context()
        time.sleep(PUBLISH_SECONDS)  # the other announcements made by now have reached the DHT
        try:
            records = latest_records(read_stage_records(context.dht, context.config.cluster), time.time(),
                                     ttl=FRESH_SECONDS)
        except Exception as error:  # a DHT hiccup: the move goes on, as it did before this check
            log(f"records not read again before moving: {type(error).__name__}: {error}")
            return True
        first = concurrent_movers(decided_on, records, str(self._started_stage().server.p2p.peer_id), move.target)
        if first:
            log(f"not moving to stage {move.target}: {len(first)} other peer(s) announced a move there at the "
                f"same time and go first ({', '.join(peer[-8:] for peer in first)})")
        return not first

    def _keep_announcing(self, target: int, estimate: float, done: threading.Event) -> None:
        """The `starting` record at the target, refreshed every `PUBLISH_SECONDS` while the move builds
        the stage and downloads it: a move takes longer than a record stays fresh (10 s), and a
        lapsed announcement let a second peer move to the same stage (then back) in one run."""
        self._announce_move(target, estimate)
        while not done.wait(PUBLISH_SECONDS):
            self._announce_move(target, estimate)

    def _announce_move(self, target: int, estimate: float) -> None:
        """Before the download: a `starting` record at the target, so that every peer's next check
        counts this one out of its old stage (which keeps two serving peers only if no other peer
        leaves it meanwhile) and in at the target (where no second peer needs to follow). Trainers
        send it no new microbatches from now on; it finishes those it holds."""
        context = self._started_context()
        peer = str(self._started_stage().server.p2p.peer_id)
        try:
            publish_stage_record(context.dht, context.config.cluster,
                                 StageRecord(target, peer, context.instance_id, estimate, 0, AgentState.STARTING,
                                             time.time(), self._domain()))
        except Exception as error:  # a DHT hiccup: the move goes on, the next check may count it twice
            log(f"move not announced: {type(error).__name__}: {error}")

    def _leave_stage(self, old: _Stage, *, write: bool) -> None:
        """Stop serving `old` (finishing what it holds, its handlers removed), write its checkpoint if
        owed, end its averager."""
        loop = self._started_loop()
        loop.run(old.server.stop())
        if write:
            old.checkpoints.submit()
        old.checkpoints.close(CLOSE_SECONDS)
        old.averager.shutdown()
        # not old.server.p2p.shutdown(): `DHT.replicate_p2p` hands every caller in this process the
        # same replica, so the new stage's server speaks through it too (shutting it down here left
        # the new stage's handler registration waiting forever)

    def _average_rounds(self) -> None:
        """Average the stage with its mates, round after round; checkpoint every `every_epochs` on duty."""
        config = self._started_context().config
        rounds = 0
        while not self._leaving.is_set():
            if self._moving.is_set():  # a lock is not fair: without this a round after round starves the move
                self._leaving.wait(0.2)
                continue
            with self._switch:
                serving = self._started_stage()
                if serving.server.state != AgentState.TRAINING:
                    break
                averaged = serving.averager.average_once(timeout=config.training.averaging_timeout)
                rounds += 1
                if rounds % config.checkpoint.every_epochs == 0 and self._on_duty(serving):
                    epoch = serving.checkpoints.submit()
                    if epoch is not None:
                        log(f"stage {serving.server.stage}: checkpoint of step {epoch} submitted")
            if not averaged:
                self._leaving.wait(1.0)  # alone on the stage, or mates busy: do not spin

    def _on_duty(self, serving: _Stage) -> bool:
        """This peer checkpoints its stage: the stage's duty by the records, or the controller's."""
        me = str(serving.server.p2p.peer_id)
        return me in stage_duty_holders(self._records, serving.server.stage) or self._started_context().has_duty()

    def flush_duty(self) -> None:
        """The stage's last checkpoint, if this peer held its duty when it began to drain."""
        self._leaving.set()
        serving, context = self._started_stage(), self._started_context()
        holders = stage_duty_holders(self._records_before_drain, serving.server.stage)
        if str(serving.server.p2p.peer_id) in holders or context.has_duty():
            epoch = serving.checkpoints.submit()
            left = context.drain_seconds_left()
            written = serving.checkpoints.close(CLOSE_SECONDS if left is None else left)
            log(f"stage {serving.server.stage}: last checkpoint (step {epoch}) "
                f"{'written' if written else 'not written in time'} before leaving")

    def shutdown(self) -> None:
        self._leaving.set()
        if self._averaging is not None:
            self._averaging.join(timeout=10)
        if self._stage is not None and self._loop is not None:
            self._stage.averager.shutdown()
            self._loop.run(self._stage.server.p2p.shutdown())  # the replica; the DHT's daemon stays
            self._loop.stop()

    def _publish(self) -> None:
        """Refresh this peer's record and read everyone's (for duty and moves)."""
        serving, context = self._started_stage(), self._started_context()
        context.progress.served = self._served_before + serving.server.served
        try:
            publish_stage_record(context.dht, context.config.cluster,
                                 serving.server.record(context.instance_id, time.time()))
            records = latest_records(read_stage_records(context.dht, context.config.cluster), time.time(),
                                     ttl=FRESH_SECONDS)
        except Exception as error:  # a DHT hiccup must not stop serving; the record is refreshed next period
            log(f"stage records not exchanged: {type(error).__name__}: {error}")
            return
        if serving.server.state == AgentState.TRAINING:
            self._records_before_drain = records
        self._records = records
        serving.server.compute.step_samples = self._step_samples(serving.server.stage, joining=0)

    def _serving_peers(self) -> set[str]:
        """The peers whose fresh records say they serve (as of the last `_publish`)."""
        return {r.peer_id for r in self._records if r.state == AgentState.TRAINING}

    def _present_peers(self) -> set[str]:
        """The peers whose fresh records say they serve or are starting (joining, or moving)."""
        return {r.peer_id for r in self._records if r.state != AgentState.DRAINING}

    def _step_samples(self, stage: int, *, joining: int) -> int:
        """This peer's share of the target batch among its stage's serving peers (and itself when joining)."""
        training = self._started_context().config.training
        mates = sum(1 for r in self._records if r.stage == stage and r.state == AgentState.TRAINING)
        return step_samples_per_peer(training.target_batch_size, training.batch_size, max(mates + joining, 1))

    def _domain(self) -> str:
        """This VM's failure domain as the controller named it ("" from an older controller)."""
        pipeline = self._started_context().config.pipeline
        return (pipeline.domain if pipeline is not None else None) or ""

    def _started_context(self) -> RoleContext:
        if self._context is None:
            raise RuntimeError("StageServerRole used before start()")
        return self._context

    def _started_task(self) -> PipelineTask:
        if self._task is None:
            raise RuntimeError("StageServerRole used before start()")
        return self._task

    def _started_loop(self) -> EventLoopThread:
        if self._loop is None:
            raise RuntimeError("StageServerRole used before start()")
        return self._loop

    def _started_stage(self) -> _Stage:
        if self._stage is None:
            raise RuntimeError("StageServerRole used before start()")
        return self._stage
