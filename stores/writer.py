"""Checkpoints written in the background, so training stalls only for an in-memory snapshot.

`submit()` copies the state's tensors on the caller's (training) thread: from then on the
optimizer may update the parameters in place without touching what is uploaded. One thread
uploads one snapshot at a time; a snapshot submitted while another is pending replaces it (the
newest state is the one worth having), and `flush(timeout)` waits for the uploads to drain, as
a draining agent must before it exits.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from spotrain.stores.payload import Constants, no_constants
from spotrain.stores.replicated import ReplicatedStore

log = logging.getLogger(__name__)


def snapshot(value: Any) -> Any:
    """A copy of `value` that shares no tensor memory with it: tensors are copied to the CPU
    (from an accelerator too), containers rebuilt, anything else deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return copy.deepcopy(value)


@dataclass(frozen=True)
class _Job:
    epoch: int
    state: dict[str, Any]


class CheckpointWriter:
    def __init__(self, target: ReplicatedStore, writer: str, keep: int = 3,
                 constants: Constants = no_constants):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.target = target
        self.writer = writer
        self.keep = keep
        self.constants = constants  # the model's buffers: see spotrain.stores.payload
        self.written = 0  # uploads that reached every store
        self.failed = 0  # uploads refused (non-finite state) or not written everywhere
        self.superseded = 0  # snapshots replaced by a newer one before their upload began
        self.last_written_epoch: int | None = None
        self.last_error: str | None = None
        self._pending: _Job | None = None
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, epoch: int, state: Mapping[str, Any]) -> float:
        """Snapshot `state` for upload as `epoch`'s checkpoint; returns the seconds it took
        (the training stall)."""
        started = time.monotonic()
        job = _Job(epoch, snapshot(state))
        with self._changed:
            if self._closed:
                raise RuntimeError("the checkpoint writer is closed")
            if self._pending is not None:
                self.superseded += 1
            self._pending = job
            self._changed.notify_all()
        return time.monotonic() - started

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is pending or uploading; False if `timeout` seconds were not enough."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def close(self, timeout: float) -> bool:
        """Flush, then stop the upload thread. Returns whether everything was uploaded."""
        drained = self.flush(timeout)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if drained:
            self._thread.join(timeout)
        return drained

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._upload(job)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _upload(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            self.target.save_state(job.epoch, job.state, self.writer, self.constants)
        except Exception as error:  # noqa: BLE001 - the upload thread must outlive any failed upload
            self.failed += 1
            self.last_error = f"epoch {job.epoch}: {error}"
            log.error("checkpoint epoch %d not written: %s", job.epoch, error)
            return
        self.written += 1
        self.last_written_epoch = job.epoch
        log.info("checkpoint epoch %d written in %.2fs", job.epoch, time.monotonic() - started)
        self.target.prune(self.keep, up_to=job.epoch)  # epochs planted ahead of ours take no slot
