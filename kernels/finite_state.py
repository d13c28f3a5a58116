"""A training state with a NaN or an infinity is never served to a peer and never loaded from one.

hivemind.Optimizer's state averager answers a newcomer's `rpc_download_state` with what
`get_current_state()` returns (run in the host process; an exception there fails the request,
and the newcomer tries its next peer), and `load_state_from_peers()` copies what one peer sent
into the parameters and the optimizer. `FiniteStateAverager` checks both. It relies on hivemind
1.1.12's `TrainingStateAverager.load_state_from_peers` calling `DecentralizedAverager`'s through
`super()`: `_CheckedDownload` sits between the two in the method order, sees the downloaded
`(metadata, tensors)` first and answers None ("no state found") for a non-finite one, so the
agent keeps its own state. hivemind names a peer's RPC handlers after its class, so the class
answers to TrainingStateAverager's names (`_get_handle_name`). Checkpoints are checked the same
way in `spotrain.stores.payload`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager

logger = logging.getLogger("spotrain.kernels.finite_state")


class NonFiniteTrainingState(RuntimeError):
    """A state that must not leave or enter this peer."""


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first floating tensor with a NaN or an infinity, or None."""
    for index, tensor in enumerate(tensors):
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return index
    return None


class _CheckedDownload(DecentralizedAverager):
    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None) -> Any:
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if not wait or loaded is None:
            return loaded
        bad = first_nonfinite(loaded[1])
        if bad is not None:
            logger.warning("refused the state downloaded from a peer: tensor %d of %d has non-finite values; "
                           "keeping our own", bad, len(loaded[1]))
            return None
        return loaded


class FiniteStateAverager(TrainingStateAverager, _CheckedDownload):
    """hivemind's TrainingStateAverager that serves and loads finite states only."""

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names a peer's handlers after its class: answer to TrainingStateAverager's names,
        # so this peer and hivemind's (or an older spotrain's) still average and download together
        return str(TrainingStateAverager._get_handle_name(namespace, method_name))

    def get_current_state(self) -> Any:
        metadata, tensors, infos = super().get_current_state()
        bad = first_nonfinite(tensors)
        if bad is not None:
            message = f"refusing to serve our state to a peer: tensor {bad} of {len(tensors)} has non-finite values"
            logger.warning(message)
            raise NonFiniteTrainingState(message)
        return metadata, tensors, infos
