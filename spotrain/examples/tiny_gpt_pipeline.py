"""tiny_gpt in stages, for SWARM: the same model, data and loss, cut between its blocks.

The head embeds the bytes and runs the first blocks, the middle stages run blocks, the tail runs
the last blocks, the final norm and the output projection. Each stage is cut out of the model the
data-parallel task builds, so the stages start from its weights and, composed, compute its
forward exactly. One difference: tiny_gpt ties its output projection to the embedding, and a
pipeline cannot share a weight between its first and last stage, so the tail starts from a copy
of the embedding and the two train apart (as in most pipeline-parallel GPTs without tying).

Building a stage builds the whole model first and keeps the stage's part: fine at this size, and
the one way to get the data-parallel model's exact weights; a model too large for one worker
builds its stages directly.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from spotrain.contracts.pipeline import PipelineTask
from spotrain.examples import tiny_gpt
from spotrain.examples.tiny_gpt import CONTEXT, VOCAB, TinyGPT


class TinyGPTStage(nn.Module):
    """Consecutive blocks of a TinyGPT; the head also embeds, the tail also projects to bytes."""

    mask: torch.Tensor

    def __init__(self, model: TinyGPT, blocks: range, *, head: bool, tail: bool):
        super().__init__()
        self.embed = copy.deepcopy(model.embed) if head else None
        self.position = nn.Parameter(model.position.detach().clone()) if head else None
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in blocks)
        self.norm = copy.deepcopy(model.norm) if tail else None
        self.unembed = nn.Parameter(model.embed.weight.detach().clone()) if tail else None
        self.register_buffer("mask", torch.as_tensor(model.mask).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if self.embed is not None and self.position is not None:
            x = self.embed(x) + self.position[:length]
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        if self.norm is not None and self.unembed is not None:
            x = self.norm(x) @ self.unembed.T
        return x


def block_ranges(depth: int, stages: int) -> list[range]:
    """Blocks per stage, as even as they divide; earlier stages take the remainder."""
    if not 2 <= stages <= depth:
        raise ValueError(f"cannot cut {depth} blocks into {stages} stages (2 <= stages <= depth)")
    size, extra = divmod(depth, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + size + (1 if stage < extra else 0))
    return [range(start, end) for start, end in itertools.pairwise(bounds)]


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[:, :-1], batch[:, 1:]


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_pipeline_task(width: int, depth: int, heads: int, context: int, stages: int) -> PipelineTask:
    whole = tiny_gpt.make_task(width, depth, heads, context)
    ranges = block_ranges(depth, stages)

    def factory(stage: int) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = whole.build_model()
            assert isinstance(model, TinyGPT)
            return TinyGPTStage(model, ranges[stage], head=stage == 0, tail=stage == stages - 1)

        return build

    def windows(worker_seed: int, batch_size: int) -> Iterator[torch.Tensor]:
        return tiny_gpt.batches(worker_seed, batch_size, context)

    return PipelineTask(stages=tuple(factory(stage) for stage in range(stages)),
                        optimizers=(tiny_gpt.make_optimizer,) * stages,
                        batches=windows, split_batch=split_batch, loss=loss)


task = make_pipeline_task(width=192, depth=3, heads=4, context=CONTEXT, stages=3)
# two stages of a narrower model: the rebalancing benchmark's, where moves between stages are easy to see
task_2stage = make_pipeline_task(width=128, depth=2, heads=4, context=CONTEXT, stages=2)
