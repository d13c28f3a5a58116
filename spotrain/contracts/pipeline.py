"""The PipelineTask contract: a model cut into stages, for SWARM pipeline parallelism.

A SWARM peer serves one stage; a trainer draws batches and sends each through one peer per stage.
So a pipeline task gives, per stage, a module factory and an optimizer factory, and says which
part of a batch enters the head and which part the tail's loss compares against:

    stage 0 (head): build_stage(0)(inputs)       -> activations
    stage i:        build_stage(i)(activations)  -> activations
    tail:           loss(build_stage(-1)(activations), targets) -> scalar

Batches are tensors (or tuples of tensors, split by `split_batch`), because they travel between
peers. Every peer of a stage must start from the same weights, so factories seed themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ModuleFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class PipelineTask:
    """A model in stages, its data, its loss and an optimizer per stage."""

    stages: tuple[ModuleFactory, ...]
    optimizers: tuple[OptimizerFactory, ...]
    batches: Callable[[int, int], Iterator[torch.Tensor]]  # (worker_seed, batch_size)
    split_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (head inputs, tail targets)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tail outputs, targets) -> scalar

    def __post_init__(self) -> None:
        if len(self.stages) < 2:
            raise ValueError(f"a pipeline needs at least 2 stages, got {len(self.stages)}")
        if len(self.optimizers) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages need as many optimizer factories, got {len(self.optimizers)}")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def build_stage(self, stage: int) -> nn.Module:
        return self.stages[self._index(stage)]()

    def make_optimizer(self, stage: int, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return self.optimizers[self._index(stage)](params)

    def is_tail(self, stage: int) -> bool:
        return self._index(stage) == self.num_stages - 1

    def _index(self, stage: int) -> int:
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} of a {self.num_stages}-stage pipeline")
        return stage


def pipeline_loss(task: PipelineTask, modules: Sequence[nn.Module], batch: torch.Tensor) -> torch.Tensor:
    """The loss the whole pipeline computes for a batch, on one machine: what SWARM distributes."""
    if len(modules) != task.num_stages:
        raise ValueError(f"{task.num_stages} stages, {len(modules)} modules")
    activations, targets = task.split_batch(batch)
    for module in modules:
        activations = module(activations)
    return task.loss(activations, targets)
