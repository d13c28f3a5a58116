"""Data-parallel training: every agent holds the whole model and steps a hivemind.Optimizer.

Resumes from the newest valid checkpoint of every store, nearest first (peers that are further
ahead win: hivemind then downloads their state), skips steps with a non-finite loss or gradients,
and, while the agent holds duty, snapshots its state on the training thread and uploads it to its
own failure domain's store in the background (spotrain.stores.CheckpointWriter).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotrain.agents.log import log
from spotrain.agents.roles.base import RoleContext
from spotrain.agents.startup import seconds_since_start

if TYPE_CHECKING:
    import torch

    from spotrain.contracts.task import TrainingTask
    from spotrain.stores import CheckpointWriter, LoadedCheckpoint, Trust

KEEP_CHECKPOINTS = 3
CLOSE_SECONDS = 30.0  # how long a leaving agent waits for its last upload when no drain window says


@dataclass(frozen=True)
class _Training:
    """What `start` built."""

    context: RoleContext
    task: TrainingTask
    model: torch.nn.Module
    optimizer: Any  # spotrain.kernels.SwarmOptimizer
    writer: CheckpointWriter
    device: torch.device  # the model's, every batch's and the optimizer state's
    precision: str | None  # the task's mixed precision (autocast on CUDA), None for full


class DataParallelRole:
    def __init__(self) -> None:
        self._training: _Training | None = None
        self._submitted: int | None = None  # the epoch of the last snapshot handed to the writer
        # (epoch it fell due, self._steps then) of a checkpoint not yet snapshotted: it waits for
        # the background update to finish, so the training thread does not
        self._owed: tuple[int, int] | None = None
        self._steps = 0  # optimizer steps taken: how long an owed checkpoint waited, in the log
        self._submit_lock = threading.Lock()  # the training thread and the drain's writer
        self._stepped_an_epoch = False  # the log says when the first epoch passed with the swarm

    def start(self, context: RoleContext) -> None:
        from spotrain.agents.device import choose_device, describe, task_precision
        from spotrain.contracts.task import load_task
        from spotrain.stores import CheckpointWriter, ReplicatedStore, named_constants

        config = context.config
        task = load_task(config.task)
        device, precision = choose_device(), task_precision(task)
        model = task.build_model()
        # a model's buffers (an attention mask's -inf) are the only tensors that may be non-finite
        constants = named_constants(_buffer_paths(model))
        # the stores are read while the optimizer is built and the live swarm gives its state: a
        # newcomer to a live swarm then trains from the peers' newer state without waiting for the read
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-read") as reader:
            reading = reader.submit(_restore, config.checkpoint.restore_order(), constants,
                                    context.checkpoint_trust)
            model.to(device)  # before the optimizer is built: its state follows the parameters
            log(f"training on {describe(device)}" + (f" with {precision} autocast" if precision else ""))
            optimizer = _build_optimizer(context, task, model)
            log(f"optimizer built {seconds_since_start():.1f}s after the agent started")
            downloaded = _catch_up(optimizer)
            checkpoint = reading.result()
        if checkpoint is not None:
            context.progress.checkpoint_epoch = checkpoint.epoch
            if not downloaded or checkpoint.epoch > optimizer.local_epoch:  # the newest state wins
                _load_checkpoint(optimizer, model, checkpoint)
                log(f"resumed from checkpoint epoch {checkpoint.epoch} of {checkpoint.store_url} "
                    f"({seconds_since_start():.1f}s after the agent started)")
        context.progress.epoch = optimizer.local_epoch
        target = ReplicatedStore.from_urls([config.checkpoint.store], trust=context.checkpoint_trust,
                                           signer=context.checkpoint_signer)
        writer = CheckpointWriter(target, _writer_name(context), keep=KEEP_CHECKPOINTS, constants=constants)
        self._training = _Training(context, task, model, optimizer, writer, device, precision)
        # hivemind waits for the running update before it schedules the next: a settled moment every epoch
        optimizer.state_averager.on_settled = lambda: self._snapshot_owed_if_settled(
            "when hivemind had waited for the background update before the next epoch's,")
        threading.Thread(target=self._write_when_draining, name="drain-checkpoint", daemon=True).start()

    def run_until(self, stop: threading.Event) -> None:
        training = self._started()
        # each agent process draws its own stream of batches
        seed = int(hashlib.sha256(f"{training.context.instance_id}:{os.getpid()}".encode()).hexdigest()[:8], 16)
        batches = training.task.batches(seed, training.context.config.training.batch_size)
        while not stop.is_set():
            self.train_step(next(batches))

    def train_step(self, batch: Any) -> float | None:
        """One local step with the checkpoint duty's bookkeeping around it; the loss, or None when
        the step was skipped (nothing reached the peers)."""
        training = self._started()
        progress, batch_size = training.context.progress, training.context.config.training.batch_size
        loss = _gradients(training, batch)
        if loss is None:
            return None
        # before the step: the background update has had this whole forward and backward to finish
        self._snapshot_owed_if_settled("before a step,")
        downloads, counted = training.optimizer.state_downloads, training.optimizer.samples_counted
        epoch = training.optimizer.local_epoch
        training.optimizer.step()
        training.optimizer.zero_grad()
        self._steps += 1
        if self._steps == 1:
            log(f"first step done at epoch {training.optimizer.local_epoch} "
                f"{seconds_since_start():.1f}s after the agent started")
        if counted == 0 and training.optimizer.samples_counted > 0:  # what benchmarks/recovery.py times
            log(f"contributing: first samples counted toward the swarm's epoch {epoch}, "
                f"{seconds_since_start():.1f}s after the agent started")
        progress.record_step(batch_size, loss)
        progress.checkpoint_epoch = _durable_epoch(training, progress.checkpoint_epoch)
        if training.optimizer.local_epoch != progress.epoch:
            stepped = training.optimizer.state_downloads == downloads  # not a download from a peer
            if stepped and not self._stepped_an_epoch and training.optimizer.local_epoch == progress.epoch + 1:
                self._stepped_an_epoch = True
                log(f"first epoch stepped with the swarm: {progress.epoch} -> {training.optimizer.local_epoch}, "
                    f"{seconds_since_start():.1f}s after the agent started")
            progress.epoch = training.optimizer.local_epoch
            if self._checkpoint_due() and not training.context.draining.is_set():
                training.context.checkpoint_soon.clear()
                self._owe(progress.epoch)
        self._snapshot_owed_if_settled("after a step,")  # without delayed updates nothing is pending: at once
        return loss

    def _owe(self, epoch: int) -> None:
        """A checkpoint fell due at `epoch`. It is snapshotted once no background update is pending
        (`_snapshot_owed_if_settled`); if one is still owed from an earlier due epoch, no settled
        moment came in between (hivemind's own wait before each epoch's update timed out), so the
        training thread waits for this one: the newest checkpoint never grows older than one
        checkpoint interval."""
        if self._owed is None:
            self._owed = (epoch, self._steps)
        else:
            self._submit_waiting(f"still owed from epoch {self._owed[0]}, waited for at epoch {epoch}")

    def _snapshot_owed_if_settled(self, moment: str) -> None:
        """Snapshot the owed checkpoint if no background update is pending, without waiting.

        hivemind's delayed optimizer step (and state averaging) run in the averager's executor;
        their futures are `pending_updates`, and a finished one's parameters reach the model only
        when `apply_delayed_updates` copies them in. With every future done and its results
        applied, the model's parameters and the optimizer's state are those of `local_epoch`,
        and nothing in the background changes them until this (the training) thread steps again.
        Called around every step, and by hivemind itself (`SettledStateAverager.on_settled`) when
        it has waited for the running update before it schedules the next epoch's."""
        training = self._started()
        if self._owed is None or training.context.draining.is_set():
            return  # a drain writes what is owed (flush_duty)
        if not all(update.done() for update in _pending(training)):
            return
        started = time.monotonic()
        # nothing pending: applies what finished (as the next step would), never waits
        training.optimizer.state_averager.step(apply_delayed_updates=True)
        due, at_step = self._owed
        self._snapshot(started, 0.0, f"due at epoch {due}, taken {moment} {self._steps - at_step} step(s) later, "
                                     f"with no background update running")

    def _checkpoint_due(self) -> bool:
        context = self._started().context
        every = context.config.checkpoint.every_epochs
        return context.has_duty() and (context.progress.epoch % every == 0 or context.checkpoint_soon.is_set())

    def flush_duty(self) -> None:
        """Snapshot the last epoch if it is owed, then wait for the upload: a copy that is not
        in the store when the VM goes is lost with it, so the log says which it was."""
        training = self._started()
        context = training.context
        # waiting for a background update is what leaving costs: the owed epoch is not lost
        if context.has_duty() and (self._owed is not None or training.optimizer.local_epoch not in (
                self._submitted, context.progress.checkpoint_epoch)):
            self._submit_waiting("written before leaving")
        left = context.drain_seconds_left()
        timeout = CLOSE_SECONDS if left is None else max(0.0, left)
        if training.writer.close(timeout):
            context.progress.checkpoint_epoch = _durable_epoch(training, context.progress.checkpoint_epoch)
            if self._submitted is not None:
                log(f"checkpoint epoch {self._submitted} written before leaving")
        else:
            log(f"checkpoint epoch {self._submitted} not written in time ({timeout:.1f}s): "
                f"the newest in {context.config.checkpoint.store} is {training.writer.last_written_epoch}")

    def _write_when_draining(self) -> None:
        """At the notice, a holder writes the state it has: the training thread may be blocked in an
        averaging round that never completes (every peer noticed at once), so it cannot be waited for.
        A background update still running is waited for up to half the drain window (the rest is
        for the upload): parameters and optimizer state are of one step only once it finished. A
        step that completes while they are copied changes the epoch, and then the drain path
        (flush_duty) writes that newer one instead."""
        from spotrain.stores.writer import snapshot

        training = self._started()
        context = training.context
        context.draining.wait()
        if not context.has_duty():
            return
        left = context.drain_seconds_left()
        wait = CLOSE_SECONDS if left is None else max(0.0, left) / 2
        _, running = concurrent.futures.wait(_pending(training), timeout=wait)
        epoch = training.optimizer.local_epoch
        if running:
            log(f"checkpoint epoch {epoch} not snapshot at the notice: the background update still ran after "
                f"{wait:.1f}s; the newest in {context.config.checkpoint.store} is {training.writer.last_written_epoch}")
            return
        if epoch in (self._submitted, context.progress.checkpoint_epoch):
            return
        with _settled_state(training) as settled:
            state = snapshot(settled)
        if training.optimizer.local_epoch != epoch:
            return  # a step completed during the copy: the drain path writes the newer epoch
        with self._submit_lock:
            if self._submitted is not None and self._submitted >= epoch:
                return
            training.writer.submit(epoch, state)
            self._submitted = epoch
        log(f"checkpoint epoch {epoch}: snapshot at the notice; uploading")
        left = context.drain_seconds_left()
        if training.writer.flush(CLOSE_SECONDS if left is None else max(0.0, left)):
            log(f"checkpoint epoch {training.writer.last_written_epoch} in {context.config.checkpoint.store}")
        else:
            log(f"checkpoint epoch {epoch} still uploading when the drain window closed")

    def shutdown(self) -> None:
        if self._training is not None:
            self._training.optimizer.shutdown()

    def _submit_waiting(self, why: str) -> None:
        """Wait for the background update (up to the averaging timeout, as hivemind does), apply
        it, and snapshot: leaving, or when an owed checkpoint never found the updates settled."""
        training = self._started()
        started = time.monotonic()
        _, running = concurrent.futures.wait(_pending(training),
                                             timeout=training.context.config.training.averaging_timeout)
        training.optimizer.state_averager.step(apply_delayed_updates=True)
        if running:
            log(f"checkpoint epoch {training.optimizer.local_epoch} not snapshot: the background update still "
                f"ran after {time.monotonic() - started:.1f}s")
            return
        self._snapshot(started, time.monotonic() - started, why)

    def _snapshot(self, started: float, waited: float, why: str) -> None:
        """Hand the state of `local_epoch` to the writer; the caller made sure no background update
        is pending, so parameters and optimizer state belong to that one step."""
        training = self._started()
        epoch = training.optimizer.local_epoch
        self._owed = None
        with self._submit_lock:
            if self._submitted is not None and self._submitted >= epoch:
                return  # the drain's writer took this epoch already
            with _settled_state(training) as state:
                training.writer.submit(epoch, state)  # copies it
            self._submitted = epoch
        # the stall is all the training thread spent on it: any wait for the background update, the
        # snapshot. Without delayed updates that update is hivemind's background state averaging.
        pending = "the delayed update" if training.context.config.training.delayed_updates else "state averaging"
        log(f"checkpoint epoch {epoch}: snapshot took {time.monotonic() - started:.3f}s of training (the stall), "
            f"{waited:.3f}s of it waiting for {pending}, "
            f"uploading to {training.context.config.checkpoint.store} in the background ({why})")

    def _started(self) -> _Training:
        if self._training is None:
            raise RuntimeError("DataParallelRole used before start()")
        return self._training


def _gradients(training: _Training, batch: Any) -> float | None:
    """Forward and backward; the loss, or None when the step is skipped (nothing reaches the peers)."""
    import torch

    from spotrain.agents.device import autocast, to_device
    from spotrain.kernels.guards import gradients_finite

    model, optimizer = training.model, training.optimizer
    with autocast(training.device, training.precision):
        loss = training.task.loss(model, to_device(batch, training.device)).float()
    if not torch.isfinite(loss):
        log(f"non-finite loss {loss.item()}: step skipped")
        optimizer.zero_grad()
        return None
    loss.backward()
    if not gradients_finite(model.parameters()):
        log("non-finite gradients: step skipped, nothing sent to peers")
        optimizer.zero_grad()
        return None
    return float(loss.item())


def _pending(training: _Training) -> list[concurrent.futures.Future[Any]]:
    """hivemind's background updates (optimizer step, averaging) not yet collected by a step. The
    set belongs to the training thread; list() of a set is one C call under the GIL, so another
    thread reads it whole."""
    return list(training.optimizer.state_averager.pending_updates)


@contextmanager
def _settled_state(training: _Training) -> Iterator[dict[str, Any]]:
    """The model's and the optimizer's state of `local_epoch`, to copy inside the block. Only
    with no background update pending: none can change them then, except the training thread
    applying a finished one, which hivemind's locks keep out during the copy.

    With offload_optimizer hivemind steps its own copy of the parameters, and a finished update
    reaches the model only when the training thread applies it: the parameters are taken from
    that copy, so they belong to the step the optimizer state does (hivemind serves its state
    to peers the same way, `get_current_state`)."""
    averager = training.optimizer.state_averager
    with averager.lock_optimizer, averager.lock_averaged_tensors:
        model = training.model.state_dict()
        if averager.offload_optimizer:
            by_model = {id(main): copy for main, copy in zip(averager.main_parameters, _offloaded(averager),
                                                             strict=True)}
            for name, parameter in training.model.named_parameters(remove_duplicate=False):
                model[name] = by_model[id(parameter)].detach()
        yield {"model": model, "optimizer": training.optimizer.state_dict(),
               "constants": sorted(_buffer_paths(training.model))}


def _offloaded(averager: Any) -> list[torch.Tensor]:
    """hivemind's offloaded copy of the parameters (the tensors its optimizer steps), in the order
    of `averager.main_parameters`."""
    return [p for group in averager.optimizer.param_groups for p in group["params"]]


def _build_optimizer(context: RoleContext, task: TrainingTask, model: torch.nn.Module) -> Any:
    from spotrain.kernels import SwarmOptimizer, optimizer_options

    training, compression = context.config.training, context.config.training.compression
    return SwarmOptimizer(
        dht=context.dht, run_id=context.config.cluster, params=model.parameters(), optimizer=task.make_optimizer,
        batch_size_per_step=training.batch_size, target_batch_size=training.target_batch_size,
        **optimizer_options(compression.gradients, compression.state, group_size=training.group_size,
                            delayed_updates=training.delayed_updates),
        matchmaking_time=training.matchmaking_time, averaging_timeout=training.averaging_timeout,
        verbose=False,
    )


def _catch_up(optimizer: Any) -> bool:
    """A newcomer behind the live swarm downloads its state now, before its first step: hivemind
    would do it in that step, after this peer had computed gradients it then throws away. True
    if the state came from a peer. (The progress tracker read the swarm's records when built.)"""
    if optimizer.local_epoch >= optimizer.tracker.global_epoch:
        return False
    before = optimizer.local_epoch
    optimizer.load_state_from_peers()  # SwarmOptimizer logs what it got, or that no peer gave it
    return bool(optimizer.local_epoch != before)


def _load_checkpoint(optimizer: Any, model: torch.nn.Module, checkpoint: LoadedCheckpoint) -> None:
    """Into a built optimizer, as hivemind loads a peer's state (load_state_from_peers): the model's
    parameters, hivemind's offloaded copy of them (the one its optimizer steps), the optimizer's
    state and epoch, and the averager's buffers."""
    import torch

    averager = optimizer.state_averager
    model.load_state_dict(checkpoint.state["model"])
    optimizer.load_state_dict(checkpoint.state["optimizer"])
    if averager.offload_optimizer:
        with torch.no_grad(), averager.lock_averaged_tensors:
            for main, copy in zip(averager.main_parameters, _offloaded(averager), strict=True):
                copy.copy_(main)
    if not averager.reuse_tensors:
        averager._load_local_tensors_into_averager_()


def _restore(urls: tuple[str, ...], constants: Any, trust: Trust) -> LoadedCheckpoint | None:
    """The newest checkpoint an admitted peer sealed that verifies and loads, nearest store first."""
    from spotrain.stores import ReplicatedStore

    return ReplicatedStore.from_urls(urls, trust=trust).load_newest(constants)


def _durable_epoch(training: _Training, known: int | None) -> int | None:
    """The newest epoch this agent's writer has put in its store, else what was known."""
    written = training.writer.last_written_epoch
    return written if written is not None else known


def _buffer_paths(model: torch.nn.Module) -> list[str]:
    """The state paths of the model's buffers: written with the checkpoint, so a reader without
    the model (`spotrain export`) knows which tensors may hold infinities."""
    return [f"model.{name}" for name, _ in model.named_buffers()]


def _writer_name(context: RoleContext) -> str:
    """Names this agent's checkpoints apart from other holders' (a store's safe name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{context.instance_id}-{os.getpid()}").lstrip(".-")[:100] or "agent"
