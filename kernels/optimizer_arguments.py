"""hivemind.Optimizer arguments for a spec's `training.compression`: codecs and averaging cadence.

One function, used by the agent and by the benchmarks, so what is measured is what runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from spotrain.kernels.codecs import StateCodec, get_codec
from spotrain.kernels.table import powersgd_rank

# Gradients are averaged every epoch; parameters, which peers only disagree on by what lossy
# codecs leave in each peer's own result (bounded with error feedback), every 4th.
STATE_AVERAGING_EVERY = 4


def optimizer_options(gradients: str, state: str, *, group_size: int | None = None,
                      delayed_updates: bool = False) -> dict[str, Any]:
    """Keyword arguments for hivemind.Optimizer: codecs, and PowerSGD's averager when chosen.

    Gradients get error feedback (each peer re-sends what its last encoding dropped); state
    averaging and state downloads do not: parameters are averaged afresh every round. The state
    codec touches parameters only; a downloaded optimizer state is the sender's, bit for bit.
    `group_size` (the swarm's expected size) lets an averaging group start as soon as that
    many peers joined, instead of waiting out the matchmaking time. `delayed_updates` averages
    an epoch's gradients and runs its optimizer step in the background while the next epoch
    computes (its parameters arrive one epoch late): on a thin link the trainer never waits
    for the wire, and the background work is a small share of one core (encoding a gradient
    takes milliseconds; the wire takes seconds).
    """
    options: dict[str, Any] = {
        "delay_grad_averaging": delayed_updates,
        "delay_optimizer_step": delayed_updates,
        "average_state_every": STATE_AVERAGING_EVERY,
        "grad_compression": get_codec(gradients, error_feedback=True),
        # the state codec encodes parameters only: optimizer statistics travel exactly (StateCodec)
        "state_averaging_compression": StateCodec(state),
        "load_state_compression": StateCodec(state, download=True),
    }
    rank = powersgd_rank(gradients)
    if rank is not None:
        from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

        factory = partial(PowerSGDGradientAverager, averager_rank=rank)
    else:  # a newcomer downloads no gradients it would throw away (kernels/gradient_averager.py)
        from spotrain.kernels.gradient_averager import StatelessGradientAverager

        factory = partial(StatelessGradientAverager)
    if group_size is not None:
        factory = partial(factory, target_group_size=group_size)
        options["averager_opts"] = {"target_group_size": group_size}
    options["grad_averager_factory"] = factory
    return options
