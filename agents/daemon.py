"""`spotrain agent`: the worker daemon started on every VM.

It reads its user-data (cluster, bootstrap peers, task, checkpoint store), joins the swarm,
resumes from the newest valid checkpoint (peers that are further ahead win: hivemind then
downloads their state), trains with hivemind.Optimizer, publishes its status, writes
checkpoints while it holds duty, and drains on a preemption notice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from spotrain.agents.checkpoints import LocalDirStore
from spotrain.agents.metadata_watch import Notice, make_client, make_watcher, watcher_settings
from spotrain.swarm_records import AgentStatus

DRAIN_MARGIN_SECONDS = 1.5  # exit this long before the notice's termination time


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} agent: {message}", flush=True)


class Agent:
    def __init__(self, config: dict):
        self.config = config
        self.metadata = watcher_settings(config)  # (kind, url) of the VM's metadata service, or None
        # the local provider and GCE name the instance in user-data; on EC2 only the VM knows its id
        self.instance_id = config.get("instance_id") or self._instance_id_from_metadata()
        self.cluster = config["cluster"]
        self.state = "starting"
        self.leaving = False  # past the training loop: flushing duty, shutting hivemind down
        self.stop = threading.Event()
        self.samples = 0
        self.epoch = 0
        self.checkpoint_epoch: int | None = None
        self._recent: list[tuple[float, int, float]] = []  # (time, samples, loss) of recent steps
        self._lock = threading.Lock()
        self.addresses: tuple[str, ...] = ()
        self.codec_table = ""
        self.save_soon = False  # a rebalance recommendation: write the next checkpoint now

    def _instance_id_from_metadata(self) -> str:
        if self.metadata is None:
            raise ValueError("user-data has no instance_id and there is no metadata service to ask")
        return make_client(*self.metadata).instance_id()

    # -- notices ------------------------------------------------------------------------
    def on_advisory(self, notice: Notice) -> None:
        log(f"advisory from the cloud: {notice.action} at {notice.time}; checkpointing early if on duty")
        self.save_soon = True

    def on_notice(self, notice: Notice | None) -> None:
        if notice is None:
            log("metadata service gone: the VM is gone, exiting now")
            os._exit(1)
        log(f"preemption notice: {notice.action} at {notice.time}; draining")
        self.begin_drain(_seconds_until(notice.time))

    def begin_drain(self, seconds_left: float) -> None:
        if self.stop.is_set():
            return
        self.state = "draining"
        self.stop.set()
        try:
            self.publisher.publish_now()
        except Exception:
            pass
        # A step blocked in averaging cannot be interrupted; abandon it before the hard kill.
        self._abandon_timer = threading.Timer(max(0.5, seconds_left - DRAIN_MARGIN_SECONDS), self._abandon)
        self._abandon_timer.daemon = True
        self._abandon_timer.start()

    def _abandon(self) -> None:
        if self.leaving:
            log("drain window ending while hivemind shuts down: exiting now (the checkpoint is flushed)")
        else:
            log("drain window ending with a step still in flight: abandoning it")
        os._exit(0)

    # -- status -------------------------------------------------------------------------
    def record_step(self, samples: int, loss: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.samples += samples
            self._recent.append((now, samples, loss))
            self._recent = [r for r in self._recent if now - r[0] <= 20.0]

    def snapshot(self) -> AgentStatus:
        from spotrain.kernels import traffic

        with self._lock:
            recent = list(self._recent)
        rate, loss = 0.0, None
        if recent:
            span = max(time.monotonic() - recent[0][0], 1e-3)
            rate = sum(r[1] for r in recent) / span if len(recent) > 1 else 0.0
            finite = [r[2] for r in recent if math.isfinite(r[2])]
            loss = sum(finite) / len(finite) if finite else None
        return AgentStatus(
            instance_id=self.instance_id, state=self.state, epoch=self.epoch, samples=self.samples,
            samples_per_second=rate, loss=loss, bytes_sent=traffic.sent, bytes_received=traffic.received,
            checkpoint_epoch=self.checkpoint_epoch, addresses=self.addresses, time=time.time(),
            codec_table=self.codec_table,
        )

    # -- main ---------------------------------------------------------------------------
    def run(self) -> int:
        import hivemind
        import torch

        from spotrain.agents.codec_check import EXIT_CODEC_MISMATCH, CodecTableMismatch, check_codec_table
        from spotrain.agents.memory import keep_freed_memory
        from spotrain.agents.status import StatusPublisher
        from spotrain.kernels import SwarmOptimizer, codec_table_fingerprint, install_codecs, optimizer_options
        from spotrain.kernels.guards import gradients_finite
        from spotrain.task import load_task

        cfg = self.config
        keep_freed_memory()  # before training allocates: steps reuse their buffers instead of faulting them in
        torch.set_num_threads(int(cfg.get("torch_threads", 1)))
        task = load_task(cfg["task"])
        install_codecs()
        compression = cfg["training"]["compression"]
        self.codec_table = codec_table_fingerprint(compression["gradients"], compression["state"])

        listen = f"/ip4/{cfg.get('host', '127.0.0.1')}/tcp/{int(cfg.get('port', 0))}"  # port 0: any free port
        dht = hivemind.DHT(initial_peers=cfg["initial_peers"], host_maddrs=[listen], start=True)
        self.addresses = tuple(str(a) for a in dht.get_visible_maddrs())
        Path("swarm-addresses.json").write_text(json.dumps(list(self.addresses)))
        log(f"joined the swarm as {dht.peer_id} at {', '.join(self.addresses)}")
        self.publisher = StatusPublisher(dht, self.cluster, self.instance_id, self.snapshot)
        self.publisher.publish_now()  # our codec table is visible before we check theirs
        try:
            check_codec_table(dht, self.cluster, self.instance_id, self.codec_table)
        except CodecTableMismatch as error:
            log(f"refusing to train: {error}")
            dht.shutdown()
            return EXIT_CODEC_MISMATCH
        self.publisher.start()

        model = task.build_model()
        store = LocalDirStore.from_url(cfg["checkpoint"]["store"])
        checkpoint = store.load_newest()
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        training = cfg["training"]
        optimizer = SwarmOptimizer(
            dht=dht, run_id=self.cluster, params=model.parameters(), optimizer=task.make_optimizer,
            batch_size_per_step=training["batch_size"], target_batch_size=training["target_batch_size"],
            **optimizer_options(compression["gradients"], compression["state"], group_size=training.get("group_size"),
                                delayed_updates=bool(training.get("delayed_updates", False))),
            matchmaking_time=training["matchmaking_time"], averaging_timeout=training["averaging_timeout"],
            verbose=False,
        )
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            self.checkpoint_epoch = checkpoint["epoch"]
            log(f"resumed from checkpoint epoch {checkpoint['epoch']}")
        self.epoch = optimizer.local_epoch

        if self.metadata is not None:
            make_watcher(*self.metadata, self.on_notice, on_advisory=self.on_advisory).start()
        signal.signal(signal.SIGTERM, lambda *_: self.begin_drain(float(cfg.get("sigterm_grace_seconds", 10))))

        every = int(cfg["checkpoint"]["every_epochs"])
        seed = int(hashlib.sha256(f"{self.instance_id}:{os.getpid()}".encode()).hexdigest()[:8], 16)
        batches = task.batches(seed, training["batch_size"])
        self.state = "training"
        while not self.stop.is_set():
            loss = task.loss(model, next(batches))
            if not torch.isfinite(loss):
                log(f"non-finite loss {loss.item()}: step skipped")
                optimizer.zero_grad()
                continue
            loss.backward()
            if not gradients_finite(model.parameters()):
                log("non-finite gradients: step skipped, nothing sent to peers")
                optimizer.zero_grad()
                continue
            optimizer.step()
            optimizer.zero_grad()
            self.record_step(training["batch_size"], loss.item())
            if optimizer.local_epoch != self.epoch:
                self.epoch = optimizer.local_epoch
                due = self.epoch % every == 0 or self.save_soon
                if self.publisher.has_duty and due and not self.stop.is_set():
                    self.save_soon = False
                    self._save(store, model, optimizer)

        log("leaving the swarm")
        self.leaving = True
        if self.publisher.has_duty and self.epoch != self.checkpoint_epoch:
            self._save(store, model, optimizer)  # flush the checkpoint duty before we go
        self.publisher.stop()
        optimizer.shutdown()
        dht.shutdown()
        log("drained")
        return 0

    def _save(self, store: LocalDirStore, model, optimizer) -> None:
        started = time.monotonic()
        # with delayed updates an optimizer step may still run in the background: finish and apply
        # it first, so the checkpoint's parameters and optimizer state belong to the same step
        optimizer.state_averager.step(wait_for_delayed_updates=True)
        store.save(self.epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        store.prune(keep=3)
        self.checkpoint_epoch = self.epoch
        log(f"checkpoint epoch {self.epoch} written in {time.monotonic() - started:.2f}s")


def _seconds_until(iso_time: str) -> float:
    try:
        when = datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 10.0
    return max(0.0, when - time.time())


def main(user_data: Path) -> int:
    config = json.loads(user_data.read_text())
    return Agent(config).run()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
