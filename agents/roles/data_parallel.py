"""Data-parallel training: every agent holds the whole model and steps a hivemind.Optimizer.

Resumes from the newest valid checkpoint of every store, nearest first (peers that are further
ahead win: hivemind then downloads their state), skips steps with a non-finite loss or gradients,
and, while the agent holds duty, snapshots its state on the training thread and uploads it to its
own failure domain's store in the background (spotrain.stores.CheckpointWriter).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotrain.agents.log import log
from spotrain.agents.roles.base import RoleContext

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
        self._submit_lock = threading.Lock()  # the training thread and the drain's writer

    def start(self, context: RoleContext) -> None:
        from spotrain.agents.device import choose_device, describe, task_precision
        from spotrain.contracts.task import load_task
        from spotrain.kernels import SwarmOptimizer, optimizer_options
        from spotrain.stores import CheckpointWriter, ReplicatedStore, named_constants

        config, training = context.config, context.config.training
        task = load_task(config.task)
        device, precision = choose_device(), task_precision(task)
        model = task.build_model()
        # a model's buffers (an attention mask's -inf) are the only tensors that may be non-finite
        constants = named_constants(_buffer_paths(model))
        checkpoint = _restore(config.checkpoint.restore_order(), constants, context.checkpoint_trust)
        if checkpoint is not None:
            model.load_state_dict(checkpoint.state["model"])
        model.to(device)  # before the optimizer is built: its state follows the parameters
        log(f"training on {describe(device)}" + (f" with {precision} autocast" if precision else ""))
        compression = training.compression
        optimizer = SwarmOptimizer(
            dht=context.dht, run_id=config.cluster, params=model.parameters(), optimizer=task.make_optimizer,
            batch_size_per_step=training.batch_size, target_batch_size=training.target_batch_size,
            **optimizer_options(compression.gradients, compression.state, group_size=training.group_size,
                                delayed_updates=training.delayed_updates),
            matchmaking_time=training.matchmaking_time, averaging_timeout=training.averaging_timeout,
            verbose=False,
        )
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint.state["optimizer"])
            context.progress.checkpoint_epoch = checkpoint.epoch
            log(f"resumed from checkpoint epoch {checkpoint.epoch} of {checkpoint.store_url}")
        context.progress.epoch = optimizer.local_epoch
        target = ReplicatedStore.from_urls([config.checkpoint.store], trust=context.checkpoint_trust,
                                           signer=context.checkpoint_signer)
        writer = CheckpointWriter(target, _writer_name(context), keep=KEEP_CHECKPOINTS, constants=constants)
        self._training = _Training(context, task, model, optimizer, writer, device, precision)
        threading.Thread(target=self._write_when_draining, name="drain-checkpoint", daemon=True).start()

    def run_until(self, stop: threading.Event) -> None:
        training = self._started()
        progress, batch_size = training.context.progress, training.context.config.training.batch_size
        # each agent process draws its own stream of batches
        seed = int(hashlib.sha256(f"{training.context.instance_id}:{os.getpid()}".encode()).hexdigest()[:8], 16)
        batches = training.task.batches(seed, batch_size)
        while not stop.is_set():
            loss = _step(training, next(batches))
            if loss is None:
                continue
            progress.record_step(batch_size, loss)
            progress.checkpoint_epoch = _durable_epoch(training, progress.checkpoint_epoch)
            if training.optimizer.local_epoch != progress.epoch:
                progress.epoch = training.optimizer.local_epoch
                if self._checkpoint_due() and not stop.is_set():
                    training.context.checkpoint_soon.clear()
                    self._submit()

    def _checkpoint_due(self) -> bool:
        context = self._started().context
        every = context.config.checkpoint.every_epochs
        return context.has_duty() and (context.progress.epoch % every == 0 or context.checkpoint_soon.is_set())

    def flush_duty(self) -> None:
        """Snapshot the last epoch if it is owed, then wait for the upload: a copy that is not
        in the store when the VM goes is lost with it, so the log says which it was."""
        training = self._started()
        context = training.context
        if context.has_duty() and context.progress.epoch not in (self._submitted, context.progress.checkpoint_epoch):
            self._submit()
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
        Between steps the parameters and optimizer state belong to `local_epoch`; a step that completes
        while they are copied changes the epoch, and then the drain path writes that newer one instead."""
        from spotrain.stores.writer import snapshot

        training = self._started()
        context = training.context
        context.draining.wait()
        epoch = training.optimizer.local_epoch
        if not context.has_duty() or epoch in (self._submitted, context.progress.checkpoint_epoch):
            return
        state = snapshot({"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
                          "constants": sorted(_buffer_paths(training.model))})
        if training.optimizer.local_epoch != epoch:
            return  # a step completed during the copy: the drain path writes the newer epoch
        with self._submit_lock:
            if self._submitted is not None and self._submitted >= epoch:
                return
            training.writer.submit(epoch, state)
            self._submitted = epoch
        log(f"checkpoint epoch {epoch}: the state before the step in flight, snapshot at the notice; uploading")
        left = context.drain_seconds_left()
        if training.writer.flush(CLOSE_SECONDS if left is None else max(0.0, left)):
            log(f"checkpoint epoch {training.writer.last_written_epoch} in {context.config.checkpoint.store}")
        else:
            log(f"checkpoint epoch {epoch} still uploading when the drain window closed")

    def shutdown(self) -> None:
        if self._training is not None:
            self._training.optimizer.shutdown()

    def _submit(self) -> None:
        training = self._started()
        epoch, started = training.context.progress.epoch, time.monotonic()
        # with delayed updates an optimizer step may still run in the background: finish and apply
        # it first, so the checkpoint's parameters and optimizer state belong to the same step
        training.optimizer.state_averager.step(wait_for_delayed_updates=True)
        waited = time.monotonic() - started
        with self._submit_lock:
            training.writer.submit(epoch, {"model": training.model.state_dict(),
                                           "optimizer": training.optimizer.state_dict(),
                                           "constants": sorted(_buffer_paths(training.model))})
            self._submitted = epoch
        # the stall is all the training thread waited for: the delayed update and the snapshot
        log(f"checkpoint epoch {epoch}: snapshot took {time.monotonic() - started:.3f}s of training (the stall), "
            f"{waited:.3f}s of it waiting for the delayed update, "
            f"uploading to {training.context.config.checkpoint.store} in the background")

    def _started(self) -> _Training:
        if self._training is None:
            raise RuntimeError("DataParallelRole used before start()")
        return self._training


def _step(training: _Training, batch: Any) -> float | None:
    """One local step; None when it was skipped (nothing reached the peers)."""
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
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


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
