"""hivemind's GradientAverager without the state download a newcomer throws away.

`hivemind.Optimizer.load_state_from_peers` downloads the state averager's state (parameters,
optimizer statistics, epoch), then calls the gradient averager's `load_state_from_peers` too.
The plain GradientAverager does not override it: `DecentralizedAverager`'s downloads a peer's
last averaged gradients (uncompressed: no `state_compression` is given) and returns them, and
hivemind drops the result. Those buffers are overwritten before any use (the next round's
average, or the local accumulators when no group formed), so the download is wire time and CPU
on both peers for nothing: on the emulated cloud a third of a newcomer's download
(docs/architecture.md, "Recovery, measured"). `StatelessGradientAverager` neither downloads nor
offers it. PowerSGD's averager keeps its own (its error-feedback state is loaded).
"""

from __future__ import annotations

from typing import Any

from hivemind.optim.grad_averager import GradientAverager


class StatelessGradientAverager(GradientAverager):
    """A GradientAverager that serves and downloads no state: a newcomer needs none of it."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_state_sharing", False)  # not declared as a donor: nobody downloads from it
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names a peer's handlers after its class: answer to GradientAverager's names, so this
        # peer averages with hivemind's (and an older spotrain's) gradient averagers
        return str(GradientAverager._get_handle_name(namespace, method_name))

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None) -> None:
        """No download: what a peer would send is never loaded (hivemind calls this with wait=True)."""
        return None
