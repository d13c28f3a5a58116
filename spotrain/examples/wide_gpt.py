"""A GPT too large for one worker's memory budget (examples/local-swarm-wide.yaml): 8 blocks of
width 512 on tiny_gpt's bytes, about 25M parameters, 0.41 GB to train whole with Adam (weights,
gradients, two moments: 16 bytes a parameter). `pipeline` cuts it into 4 stages of 2 blocks, and
each stage is built on its own (seeded per stage), never the whole model, so a stage peer holds a
quarter of it. `task` is the whole model, for data parallelism: a spec with
`training.memory_per_worker_gb: 0.25` refuses it and accepts the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from spotrain.contracts.pipeline import PipelineTask
from spotrain.contracts.task import SimpleTask
from spotrain.examples import tiny_gpt
from spotrain.examples.tiny_gpt import CONTEXT, VOCAB, Block
from spotrain.examples.tiny_gpt_pipeline import block_ranges, loss, split_batch

WIDTH, DEPTH, HEADS, STAGES = 512, 8, 8, 4


class WideStage(nn.Module):
    """Blocks of the wide GPT; the head embeds, the tail projects to bytes."""

    mask: torch.Tensor

    def __init__(self, blocks: range, *, head: bool, tail: bool):
        super().__init__()
        torch.manual_seed(1000 + blocks.start)  # every peer of a stage starts from the same weights
        self.embed = nn.Embedding(VOCAB, WIDTH) if head else None
        self.position = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02) if head else None
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS) for _ in blocks)
        self.norm = nn.LayerNorm(WIDTH) if tail else None
        self.unembed = nn.Parameter(torch.randn(VOCAB, WIDTH) * 0.02) if tail else None
        self.register_buffer("mask", torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if self.embed is not None and self.position is not None:
            x = self.embed(x) + self.position[:length]
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        if self.norm is not None and self.unembed is not None:
            x = self.norm(x) @ self.unembed.T
        return x


def _stage_factory(stage: int) -> Callable[[], nn.Module]:
    ranges = block_ranges(DEPTH, STAGES)
    return lambda: WideStage(ranges[stage], head=stage == 0, tail=stage == STAGES - 1)


def _windows(worker_seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    return tiny_gpt.batches(worker_seed, batch_size, CONTEXT)


def _whole() -> nn.Module:
    return nn.Sequential(*(_stage_factory(stage)() for stage in range(STAGES)))


def _whole_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    inputs, targets = split_batch(batch)
    return loss(model(inputs), targets)


pipeline = PipelineTask(stages=tuple(_stage_factory(stage) for stage in range(STAGES)),
                        optimizers=(tiny_gpt.make_optimizer,) * STAGES, batches=_windows,
                        split_batch=split_batch, loss=loss)
task = SimpleTask(build_model=_whole, batches=_windows, loss=_whole_loss, make_optimizer=tiny_gpt.make_optimizer)
