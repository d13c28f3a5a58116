"""The compression arguments of hivemind.Optimizer for a spec's `training.compression`.

One function, used by the agent and by the benchmarks, so what is measured is what runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from spotrain.kernels.codecs import get_codec
from spotrain.kernels.table import powersgd_rank


def optimizer_options(gradients: str, state: str) -> dict[str, Any]:
    """Keyword arguments for hivemind.Optimizer: codecs, and PowerSGD's averager when chosen.

    Gradients get error feedback (each peer re-sends what its last encoding dropped); state
    averaging and state downloads do not: parameters are averaged afresh every round.
    """
    options: dict[str, Any] = {
        "grad_compression": get_codec(gradients, error_feedback=True),
        "state_averaging_compression": get_codec(state),
        "load_state_compression": get_codec(state),
    }
    rank = powersgd_rank(gradients)
    if rank is not None:
        from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

        options["grad_averager_factory"] = partial(PowerSGDGradientAverager, averager_rank=rank)
    return options
