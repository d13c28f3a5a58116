"""`spotrain agent`: the worker daemon started on every VM.

The lifecycle of one agent: read its user-data (`AgentConfig`), join the swarm's DHT, publish its
status, refuse peers with another codec table, start its role (`roles.DataParallelRole`: train and
checkpoint; in swarm mode a stage server or a trainer, as the user-data says), watch the metadata
service for a preemption notice, drain, and end every process it started before it exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from spotrain.agents.log import log
from spotrain.agents.metadata_watch import Notice, make_client, make_watcher, watcher_settings
from spotrain.agents.process_tree import end_descendants
from spotrain.agents.progress import Progress
from spotrain.agents.roles.base import Role, RoleContext
from spotrain.agents.roles.data_parallel import DataParallelRole
from spotrain.agents.startup import seconds_since_start
from spotrain.contracts.agent_config import AgentConfig, AgentConfigError
from spotrain.contracts.log_format import configure as configure_logging
from spotrain.contracts.log_noise import leaving as leaving_cleanly
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState

if TYPE_CHECKING:
    from hivemind import DHT

    from spotrain.agents.admission import Gate
    from spotrain.agents.status import StatusPublisher

DRAIN_MARGIN_SECONDS = 1.5  # exit this long before the notice's termination time
CHILDREN_GRACE_SECONDS = 0.5  # from SIGTERM to SIGKILL for the processes the agent started
LEAVING_SECONDS = 1.0  # kept from the drain window for shutting the optimizer and the DHT down
EXIT_BAD_CONFIG = 78  # sysexits' EX_CONFIG: restarting will not help


class Agent:
    def __init__(self, config: AgentConfig, role: Role | None = None):
        self.config = config
        self.metadata = watcher_settings(config)  # (kind, url) of the VM's metadata service, or None
        # the local provider and GCE name the instance in user-data; on EC2 only the VM knows its id
        self.instance_id = config.instance_id or self._instance_id_from_metadata()
        self.cluster = config.cluster
        self.role: Role = role or role_for(config)
        self.state = AgentState.STARTING
        self.leaving = False  # past the role's work: flushing duty, shutting hivemind down
        self.stop = threading.Event()
        self.draining = threading.Event()  # the role's cue to write its checkpoint duty now
        self.checkpoint_soon = threading.Event()  # a rebalance recommendation: write the next checkpoint now
        self.progress = Progress()
        self.addresses: tuple[str, ...] = ()
        self.codec_table = ""
        self.publisher: StatusPublisher | None = None
        self.gate: Gate | None = None  # agents/admission.py: None when the user-data admits everyone
        self.drain_deadline: float | None = None  # time.monotonic() when the drain window's timer fires

    def _instance_id_from_metadata(self) -> str:
        if self.metadata is None:
            raise ValueError("user-data has no instance_id and there is no metadata service to ask")
        return make_client(*self.metadata).instance_id()

    # -- notices ------------------------------------------------------------------------
    def on_advisory(self, notice: Notice) -> None:
        log(f"advisory from the cloud: {notice.action} at {notice.time}; checkpointing early if on duty")
        self.checkpoint_soon.set()

    def on_notice(self, notice: Notice | None) -> None:
        if notice is None:
            log("metadata service gone: the VM is gone, exiting now")
            _exit_now(1)
        else:
            log(f"preemption notice: {notice.action} at {notice.time}; draining")
            self.begin_drain(_seconds_until(notice.time))

    def begin_drain(self, seconds_left: float) -> None:
        if self.stop.is_set():
            return
        # A step blocked in averaging cannot be interrupted; abandon it before the hard kill. The
        # timer starts first: publishing may wait on unresponsive peers.
        window = max(0.5, seconds_left - DRAIN_MARGIN_SECONDS)
        self.drain_deadline = time.monotonic() + window
        timer = threading.Timer(window, self._abandon)
        timer.daemon = True
        timer.start()
        self.state = AgentState.DRAINING
        self.stop.set()
        self.draining.set()
        try:
            if self.publisher is not None:
                self.publisher.publish_now()
        except Exception as error:  # the controller also learns of the drain when the record expires
            log(f"draining status not published: {type(error).__name__}: {error}")

    def _abandon(self) -> None:
        if self.leaving:
            log("drain window ending while leaving the swarm: exiting now")
        else:
            log("drain window ending with a step still in flight: abandoning it")
        _exit_now(0)

    def _drain_seconds_left(self) -> float | None:
        """Until shortly before the drain timer fires: what the role has for its last upload, with
        time left to shut hivemind down."""
        if self.drain_deadline is None:
            return None
        return max(0.0, self.drain_deadline - time.monotonic() - LEAVING_SECONDS)

    # -- status -------------------------------------------------------------------------
    def snapshot(self) -> AgentStatus:
        from spotrain.agents.egress import sent_to
        from spotrain.kernels import traffic
        from spotrain.kernels.poison_guard import offences

        rate, loss = self.progress.rate_and_loss()
        return AgentStatus(
            instance_id=self.instance_id, state=self.state, epoch=self.progress.epoch, samples=self.progress.samples,
            samples_per_second=rate, loss=loss, bytes_sent=traffic.sent, bytes_received=traffic.received,
            checkpoint_epoch=self.progress.checkpoint_epoch, addresses=self.addresses, time=time.time(),
            served=self.progress.served,
            codec_table=self.codec_table, role=self.config.pipeline.role if self.config.pipeline else "",
            egress_bytes=sent_to.snapshot(), egress_since=sent_to.since,
            offenders=offences.snapshot(),
        )

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        import torch

        from spotrain.agents import egress
        from spotrain.agents.memory import keep_freed_memory
        from spotrain.kernels import codec_table_fingerprint, install_codecs
        from spotrain.kernels.poison_guard import install_poison_guard

        keep_freed_memory()  # before training allocates: steps reuse their buffers instead of faulting them in
        torch.set_num_threads(self.config.torch_threads)
        install_codecs()
        # both before hivemind forks its averagers; the guard first: it sets hivemind's runner class,
        # and the egress meter subclasses whichever runner class is set when it installs
        if not install_poison_guard():
            log("poison guard OFF (SPOTRAIN_POISON_GUARD=0): received parts are averaged unchecked")
        egress.install()  # the averagers count into shared memory
        compression = self.config.training.compression
        # swarm peers also exchange activations, so their codec joins the table they must share
        self.codec_table = codec_table_fingerprint(compression.gradients, compression.state,
                                                   compression.activations if self.config.mode == "swarm" else None)
        log(f"imports done {seconds_since_start():.1f}s after the agent started")
        try:
            from spotrain.agents.admission import AdmissionError, admit_self

            try:  # before hivemind forks anything: every process of this agent inherits the gate
                self.gate = admit_self(self.config, Path.cwd(), log)
            except AdmissionError as error:
                log(f"agent: {error}")
                return EXIT_BAD_CONFIG
            dht = self._join()
            return self._serve(dht)
        finally:
            end_descendants(CHILDREN_GRACE_SECONDS)  # whatever hivemind left: nothing outlives the agent

    def _join(self) -> DHT:
        from spotrain.agents.swarm_join import join_swarm, keep_merged

        source = make_client(*self.metadata) if self.metadata is not None else None
        dht = join_swarm(self.config, source, log)
        if source is not None:
            threading.Thread(target=keep_merged, args=(dht, source, self.stop, log), name="swarm-merge",
                             daemon=True).start()
        self.addresses = tuple(str(a) for a in dht.get_visible_maddrs())
        log(f"joined the swarm as {dht.peer_id} at {', '.join(self.addresses)} "
            f"({seconds_since_start():.1f}s after the agent started)")
        return dht

    def _serve(self, dht: DHT) -> int:
        from spotrain.agents.codec_check import EXIT_CODEC_MISMATCH, CodecTableMismatch, check_codec_table
        from spotrain.agents.status import StatusPublisher

        self.publisher = publisher = StatusPublisher(dht, self.cluster, self.instance_id, self.snapshot, self.gate)
        publisher.publish_now()  # our codec table is visible before we check theirs
        try:
            admitted = self.gate.peers() if self.gate is not None else None
            check_codec_table(dht, self.cluster, self.instance_id, self.codec_table, self.config.codec_table, admitted)
        except CodecTableMismatch as error:
            log(f"refusing to train: {error}")
            dht.shutdown()
            return EXIT_CODEC_MISMATCH
        publisher.start()
        from spotrain.agents.admission import checkpoint_keys

        trust, signer = checkpoint_keys(self.gate, Path.cwd())
        self.role.start(RoleContext(self.config, self.instance_id, dht, self.progress,
                                    has_duty=lambda: publisher.has_duty, checkpoint_soon=self.checkpoint_soon,
                                    checkpoint_trust=trust, checkpoint_signer=signer,
                                    drain_seconds_left=self._drain_seconds_left, draining=self.draining))
        self._watch_notices()
        self.state = AgentState.TRAINING
        self.role.run_until(self.stop)
        return self._drain(dht, publisher)

    def _watch_notices(self) -> None:
        if self.metadata is not None:
            make_watcher(*self.metadata, self.on_notice, on_advisory=self.on_advisory).start()
        grace = self.config.sigterm_grace_seconds
        signal.signal(signal.SIGTERM, lambda *_: self.begin_drain(grace))

    def _drain(self, dht: DHT, publisher: StatusPublisher) -> int:
        log("leaving the swarm")
        self.leaving = True
        leaving_cleanly()  # hivemind's asyncio tasks that stop unfinished with the process are not news now
        self.role.flush_duty()  # the checkpoint duty is written before we go
        publisher.stop()
        self.role.shutdown()
        dht.shutdown()
        log("drained")
        return 0


def role_for(config: AgentConfig) -> Role:
    """Data parallelism; in swarm mode the role the controller named in the user-data."""
    if config.pipeline is None:
        return DataParallelRole()
    from spotrain.agents.roles.stage_server import StageServerRole
    from spotrain.agents.roles.swarm_trainer import SwarmTrainerRole

    return SwarmTrainerRole() if config.pipeline.role == "trainer" else StageServerRole()


def _exit_now(code: int) -> None:
    """Leave at once, from any thread, ending the processes this agent started first."""
    end_descendants(CHILDREN_GRACE_SECONDS)
    os._exit(code)


def _seconds_until(iso_time: str) -> float:
    try:
        when = datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 10.0
    return max(0.0, when - time.time())


def main(user_data: Path) -> int:
    configure_logging()  # hivemind's lines too, in the agent's format, on the VM's console
    try:
        config = AgentConfig.from_json(user_data.read_text(), source=user_data)
    except OSError as error:
        config_error = f"{user_data}: cannot read: {error.strerror}"
    except AgentConfigError as error:
        config_error = str(error)
    else:
        return Agent(config).run()
    print(f"agent: {config_error}", file=sys.stderr, flush=True)  # the one line naming the file and the key
    return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
