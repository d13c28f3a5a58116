"""A stage's forward, backward and optimizer steps as a stage peer computes them (no network).

Why accumulate: data parallelism steps once per `target_batch_size` samples, on the mean gradient
of all of them (hivemind's Optimizer). A stage peer that stepped on every microbatch took
target/batch times more, noisier steps than it, and with two microbatches in flight every
microbatch's parameters changed between its forward and its backward (measured: 1.05-1.09x data
parallelism's loss, docs/architecture.md). Here each microbatch's parameter gradient is added,
weighted by its samples, and the optimizer steps on their mean once `step_samples` samples went
backward through this peer: between steps the parameters do not move, so microbatches in flight
within a step are exactly data parallelism's accumulated batch.

Why stash: a microbatch whose forward ran before a step and whose backward comes after it must be
differentiated at the parameters its forward used, since the gradient arriving from the next
stage is that of the activations those parameters produced. Every forward reply names its
version (this compute's random token and its step count) and the backward request brings it
back. When a step is taken while forwards of the current version still await their backward,
the parameters from before the step are kept (one copy, no optimizer state); a backward of that
previous version is recomputed with them, and its gradient joins the next step (one step stale,
PipeDream's weight stashing). A backward of the current version, or of one this peer cannot
recompute (older, or another peer's: a retry elsewhere), uses the current parameters.
"""

from __future__ import annotations

import math
import secrets
import threading

import torch
from torch.func import functional_call

from spotrain.agents.pipeline.protocol import Version
from spotrain.contracts.pipeline import PipelineTask


def step_samples_per_peer(target_batch_size: int, batch_size: int, stage_peers: int) -> int:
    """Samples one stage peer accumulates per optimizer step: the stage's serving peers share the
    target batch, as data-parallel peers share hivemind's, and average their parameters; never
    fewer than one microbatch."""
    return max(batch_size, -(-target_batch_size // max(stage_peers, 1)))


class NonFiniteLoss(ValueError):
    """The tail's loss was not finite: the microbatch is not applied."""


class StageCompute:
    def __init__(self, task: PipelineTask, stage: int, step_samples: int = 1):
        if step_samples < 1:
            raise ValueError(f"step_samples must be at least 1, got {step_samples}")
        self.task, self.stage, self.step_samples = task, stage, step_samples
        self.module = task.build_stage(stage)
        self.optimizer = task.make_optimizer(stage, self.module.parameters())
        # held while a microbatch computes and steps, so averaging and checkpoints see whole steps
        self.lock = threading.Lock()
        self.token = secrets.randbits(62)
        self._steps = 0  # optimizer steps applied here (carried over by a restore)
        self.accumulated = 0  # samples whose gradients wait for the next step
        self.stale_backwards = 0  # backwards recomputed with the stashed parameters
        self._open = 0  # forwards of the current version whose backward has not come back here
        self._stash: dict[str, torch.Tensor] | None = None

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        """Parameters replaced from a checkpoint or a peer: nothing stashed or accumulated holds."""
        self._steps, self._stash, self._open, self.accumulated = value, None, 0, 0
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def version(self) -> Version:
        return self.token, self._steps

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, Version]:
        with torch.no_grad():
            output = self.module(source)
        self._open += 1
        return output, self.version

    def backward(self, source: torch.Tensor, output_grad: torch.Tensor,
                 version: Version | None) -> torch.Tensor | None:
        """The gradient of `source`; the parameters' gradients wait for the step."""
        params = self._parameters_of(version)
        source.requires_grad_(source.is_floating_point())
        output = functional_call(self.module, params, (source,)) if params is not None else self.module(source)
        return self._accumulate(output, output_grad, source, params)

    def tail(self, source: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """Forward, loss and backward in one call: the gradient of `source` and the loss."""
        source.requires_grad_(source.is_floating_point())
        loss = self.task.loss(self.module(source), targets)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite loss at stage {self.stage}: the microbatch is not applied")
        return self._accumulate(loss, None, source, None), value

    def _parameters_of(self, version: Version | None) -> dict[str, torch.Tensor] | None:
        """The stashed parameters when `version` is the one before this peer's newest step."""
        if version == self.version:
            self._open = max(self._open - 1, 0)
        elif self._stash is not None and version == (self.token, self._steps - 1):
            self.stale_backwards += 1
            return self._stash
        return None

    def _accumulate(self, output: torch.Tensor, output_grad: torch.Tensor | None, source: torch.Tensor,
                    params: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        live = list(self.module.parameters())
        used = list(params.values()) if params is not None else live
        wrt = ([source] if source.requires_grad else []) + used
        grads = torch.autograd.grad(output, wrt, grad_outputs=output_grad, allow_unused=True)
        source_grad = grads[0] if source.requires_grad else None
        samples = source.shape[0]
        with torch.no_grad():
            for param, grad in zip(live, grads[len(wrt) - len(used):], strict=True):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad * samples
                else:
                    param.grad.add_(grad, alpha=samples)
        self.accumulated += samples
        if self.accumulated >= self.step_samples:
            self._step()
        return source_grad

    def _step(self) -> None:
        """One optimizer step on the mean gradient of the accumulated samples."""
        with torch.no_grad():
            for param in self.module.parameters():
                if param.grad is not None:
                    param.grad.div_(self.accumulated)
            # forwards still awaiting their backward were computed with the parameters now replaced
            self._stash = ({name: p.detach().clone().requires_grad_() for name, p in self.module.named_parameters()}
                           if self._open else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        self.accumulated, self._open = 0, 0
