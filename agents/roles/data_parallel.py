"""Data-parallel training: every agent holds the whole model and steps a hivemind.Optimizer.

Resumes from the newest valid checkpoint (peers that are further ahead win: hivemind then
downloads their state), skips steps with a non-finite loss or gradients, and writes checkpoints
while the agent holds duty.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spotrain.agents.checkpoints import LocalDirStore
from spotrain.agents.log import log
from spotrain.agents.roles.base import RoleContext

if TYPE_CHECKING:
    import torch

    from spotrain.contracts.task import TrainingTask

KEEP_CHECKPOINTS = 3


@dataclass(frozen=True)
class _Training:
    """What `start` built."""

    context: RoleContext
    task: TrainingTask
    model: torch.nn.Module
    optimizer: Any  # spotrain.kernels.SwarmOptimizer
    store: LocalDirStore


class DataParallelRole:
    def __init__(self) -> None:
        self._training: _Training | None = None

    def start(self, context: RoleContext) -> None:
        from spotrain.contracts.task import load_task
        from spotrain.kernels import SwarmOptimizer, optimizer_options

        config, training = context.config, context.config.training
        task = load_task(config.task)
        model = task.build_model()
        store = LocalDirStore.from_url(config.checkpoint.store)
        checkpoint = store.load_newest()
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
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
            optimizer.load_state_dict(checkpoint["optimizer"])
            context.progress.checkpoint_epoch = checkpoint["epoch"]
            log(f"resumed from checkpoint epoch {checkpoint['epoch']}")
        context.progress.epoch = optimizer.local_epoch
        self._training = _Training(context, task, model, optimizer, store)

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
            if training.optimizer.local_epoch != progress.epoch:
                progress.epoch = training.optimizer.local_epoch
                if self._checkpoint_due() and not stop.is_set():
                    training.context.checkpoint_soon.clear()
                    _save(training)

    def _checkpoint_due(self) -> bool:
        context = self._started().context
        every = context.config.checkpoint.every_epochs
        return context.has_duty() and (context.progress.epoch % every == 0 or context.checkpoint_soon.is_set())

    def flush_duty(self) -> None:
        training = self._started()
        progress = training.context.progress
        if training.context.has_duty() and progress.epoch != progress.checkpoint_epoch:
            _save(training)

    def shutdown(self) -> None:
        if self._training is not None:
            self._training.optimizer.shutdown()

    def _started(self) -> _Training:
        if self._training is None:
            raise RuntimeError("DataParallelRole used before start()")
        return self._training


def _step(training: _Training, batch: Any) -> float | None:
    """One local step; None when it was skipped (nothing reached the peers)."""
    import torch

    from spotrain.kernels.guards import gradients_finite

    model, optimizer = training.model, training.optimizer
    loss = training.task.loss(model, batch)
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


def _save(training: _Training) -> None:
    started, epoch = time.monotonic(), training.context.progress.epoch
    # with delayed updates an optimizer step may still run in the background: finish and apply
    # it first, so the checkpoint's parameters and optimizer state belong to the same step
    training.optimizer.state_averager.step(wait_for_delayed_updates=True)
    training.store.save(epoch, {"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict()})
    training.store.prune(keep=KEEP_CHECKPOINTS)
    training.context.progress.checkpoint_epoch = epoch
    log(f"checkpoint epoch {epoch} written in {time.monotonic() - started:.2f}s")
