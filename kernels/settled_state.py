"""A hook for the moments hivemind's training state is settled: no background update running.

With delayed updates hivemind.Optimizer runs each epoch's optimizer step (and state averaging)
in the state averager's executor and copies the results into the model on a later step. Before
it schedules the next epoch's update, its `_update_global_epoch` waits for the running one and
applies it (`state_averager.step(wait_for_delayed_updates=True)`); `load_state_from_peers` does
the same before a download. Right then parameters and optimizer state are those of one step
and nothing in the background changes them, even when updates run back to back and never
finish between two steps. `SettledStateAverager` calls `on_settled` there, on the training
thread; hivemind's wait has a timeout, so the callback checks that nothing is still running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spotrain.kernels.finite_state import FiniteStateAverager

SCHEDULING = ("increment_epoch", "optimizer_step", "zero_grad", "averaging_round")  # step() that starts work


class SettledStateAverager(FiniteStateAverager):
    """FiniteStateAverager that calls `on_settled()` after each wait for its background updates."""

    on_settled: Callable[[], None] | None = None

    def step(self, wait_for_delayed_updates: bool | None = None, apply_delayed_updates: bool = True,
             **kwargs: Any) -> Any:
        output = super().step(wait_for_delayed_updates=wait_for_delayed_updates,
                              apply_delayed_updates=apply_delayed_updates, **kwargs)
        settling = wait_for_delayed_updates and apply_delayed_updates and not any(kwargs.get(k) for k in SCHEDULING)
        if settling and self.on_settled is not None:
            self.on_settled()
        return output
