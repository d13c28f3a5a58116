"""hivemind.Optimizer with paced progress reports: fewer signed DHT stores on the trainer's core.

hivemind's ProgressTracker publishes this peer's sample count after every local step: an
RSA-signed DHT store that every peer's DHT process validates, several times a second per peer.
Peers already extrapolate each other's progress from the reported samples/s, so a report every
`report_interval` seconds (and at once on every epoch change, which others must see promptly)
tells them as much and costs a fraction of the CPU that the trainer shares with them.

A peer's progress record expires after PROGRESS_EXPIRATION_SECONDS (hivemind's default is 60 s;
live peers refresh theirs every half of it): after a whole-fleet loss the records of the dead
peers claim a later epoch than the replacements restored from the store, and every replacement
retries downloading their state until those records are gone. So that wait is bounded by this,
and logged once.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import hivemind
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.logging import get_logger

from spotrain.kernels.settled_state import SettledStateAverager

REPORT_INTERVAL_SECONDS = 2.0
PROGRESS_EXPIRATION_SECONDS = 15.0
logger = get_logger(__name__)


class _PacedSignal(threading.Event):
    """The tracker's "report now" signal, let through at most once per interval unless urgent."""

    def __init__(self, interval: float):
        super().__init__()
        self.interval = interval
        self.urgent = False  # the next set() passes whatever the pace
        self._last = -math.inf

    def set(self) -> None:
        now = time.monotonic()
        if self.urgent or now - self._last >= self.interval:
            self._last = now
            super().set()
        self.urgent = False


class PacedProgressTracker(ProgressTracker):
    """A ProgressTracker that reports local progress at most every `report_interval` seconds,
    and immediately when the local epoch changes or its sample count restarts."""

    def __init__(self, *args: Any, report_interval: float = REPORT_INTERVAL_SECONDS, start: bool = False,
                 **kwargs: Any):
        super().__init__(*args, start=False, **kwargs)
        self.should_report_progress: _PacedSignal = _PacedSignal(report_interval)  # before the reporter runs
        if start:
            self.start()

    def report_local_progress(self, local_epoch: int, samples_accumulated: int,
                              update_global_samples: bool = True) -> None:
        self.should_report_progress.urgent = (local_epoch != self.local_progress.epoch
                                              or samples_accumulated < self.local_progress.samples_accumulated)
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)

    def shutdown(self, timeout: float | None = None) -> None:
        self.should_report_progress.urgent = True  # wake the reporter so that it sees the shutdown
        super().shutdown(timeout)


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose progress tracker paces its reports (see the module's doc) and whose
    state averager serves and loads finite states only (`spotrain.kernels.finite_state`) and says when
    its state is settled (`spotrain.kernels.settled_state`)."""

    def __init__(self, *args: Any, progress_report_interval: float = REPORT_INTERVAL_SECONDS, **kwargs: Any):
        self._progress_report_interval = progress_report_interval  # read by _make_progress_tracker
        self._told_unreachable = False
        self.state_downloads = 0  # states taken from a peer
        self.samples_counted = 0  # local samples this peer reported toward the swarm's epochs
        kwargs["tracker_opts"] = {"metadata_expiration": PROGRESS_EXPIRATION_SECONDS, **kwargs.get("tracker_opts", {})}
        super().__init__(*args, **kwargs)

    def load_state_from_peers(self, **kwargs: Any) -> None:
        """hivemind's download; when no peer gave its state, one line saying why training goes on from
        this peer's own (store) state, and for how long the stale records may still ask for a download."""
        before, started = self.local_epoch, time.monotonic()
        super().load_state_from_peers(**kwargs)
        if self.local_epoch != before:  # where a newcomer's start goes: the download is most of it
            self.state_downloads += 1
            # The state came from the newest peer. Once an epoch hivemind checks that this peer's epoch
            # is exactly the swarm's and downloads it all again if not; on a thin link a download takes
            # longer than an epoch, so a newcomer would chase the swarm. One epoch behind is in sync for
            # hivemind (its catch-up after a download, its check between epochs): until this peer's
            # next epoch only that check applies.
            self._should_check_synchronization_on_update = False
            logger.info(f"state from a peer: epoch {before} -> {self.local_epoch} in {time.monotonic() - started:.1f}s "
                        f"(the swarm's records say epoch {self.tracker.global_epoch})")
        behind = self.local_epoch < self.tracker.global_epoch - 1 and self.local_epoch == before
        if behind and not self._told_unreachable:
            self._told_unreachable = True
            logger.warning(f"no live peer gave its state (the swarm's records claim epoch {self.tracker.global_epoch},"
                           f" this peer is at {self.local_epoch}): those peers are gone; training on from this "
                           f"peer's state once their records expire (at most {PROGRESS_EXPIRATION_SECONDS:.0f}s)")
        elif not behind:
            self._told_unreachable = False

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler: Any) -> bool:
        """hivemind's; counts the samples it reported to the swarm (a step in sync with the swarm whose
        gradients were valid): the moment a newcomer first contributes (the agent's log says when)."""
        counted = bool(super()._check_and_accumulate_gradients(batch_size, grad_scaler))
        if counted:
            self.samples_counted += batch_size
        return counted

    def _make_progress_tracker(self, target_batch_size: int, **kwargs: Any) -> ProgressTracker:
        return PacedProgressTracker(
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, report_interval=self._progress_report_interval, start=True,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs: Any) -> SettledStateAverager:
        # hivemind 1.1.12's own arguments, with the checked class
        return SettledStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs,
        )
