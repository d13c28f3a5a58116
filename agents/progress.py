"""What the agent's role has done so far, as its status record reports it."""

from __future__ import annotations

import math
import threading
import time

RECENT_SECONDS = 20.0  # the window of steps the published rate and loss average over


class Progress:
    """Written by the role's training thread, read by the status publisher's thread."""

    def __init__(self) -> None:
        self.samples = 0  # since the agent started
        self.epoch = 0
        self.checkpoint_epoch: int | None = None  # the newest epoch this agent wrote to a store
        # SWARM stage peers train no samples of their own (the trainers count those): their progress
        # is the microbatch calls they answered, since the agent started, over every stage served
        self.served = 0
        self._recent: list[tuple[float, int, float]] = []  # (time, samples, loss) of recent steps
        self._lock = threading.Lock()

    def record_step(self, samples: int, loss: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.samples += samples
            self._recent.append((now, samples, loss))
            self._recent = [r for r in self._recent if now - r[0] <= RECENT_SECONDS]

    def rate_and_loss(self) -> tuple[float, float | None]:
        """Samples per second and mean finite loss over the recent steps."""
        with self._lock:
            recent = list(self._recent)
        if not recent:
            return 0.0, None
        span = max(time.monotonic() - recent[0][0], 1e-3)
        rate = sum(r[1] for r in recent) / span if len(recent) > 1 else 0.0
        finite = [r[2] for r in recent if math.isfinite(r[2])]
        return rate, (sum(finite) / len(finite) if finite else None)
