"""A small causal Transformer on bytes of the Python standard library's own sources.

The corpus is always present wherever Python is, so the task needs no download. Every worker
reads the same corpus and samples its own random windows, seeded by its worker seed.

Two sizes: `task` (1.4M parameters, 64-byte context: the demo's and the tests') and `task_3m`
(3.3M parameters, 256-byte context: about 20 samples/s on one CPU thread, the WAN benchmark's
model, where a step's compute is long enough to hide communication behind).
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from spotrain.contracts.task import SimpleTask

VOCAB = 256  # bytes
CONTEXT = 64
CORPUS_BYTES = 4 * 1024 * 1024


@lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """The first few MiB of the standard library's .py files, in sorted order, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= CORPUS_BYTES:
            break
    if size < CONTEXT * 16:
        raise RuntimeError(f"too little text under {root} for the tiny GPT corpus")
    return torch.frombuffer(bytearray(b"".join(chunks)[:CORPUS_BYTES]), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    mask: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, width: int = 192, depth: int = 3, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", torch.triu(torch.full((context, context), -math.inf), diagonal=1))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        return self.norm(x) @ self.embed.weight.T  # tied output head


def batches(worker_seed: int, batch_size: int, context: int = CONTEXT) -> Iterator[torch.Tensor]:
    data = corpus()
    generator = torch.Generator().manual_seed(worker_seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + context + 1] for s in starts.tolist()])


def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-3)


def make_task(width: int, depth: int, heads: int, context: int) -> SimpleTask:
    def build() -> nn.Module:
        torch.manual_seed(0)  # every worker starts from the same weights
        return TinyGPT(width, depth, heads, context)

    def windows(worker_seed: int, batch_size: int) -> Iterator[torch.Tensor]:
        return batches(worker_seed, batch_size, context)

    return SimpleTask(build_model=build, batches=windows, loss=loss, make_optimizer=make_optimizer)


task = make_task(width=192, depth=3, heads=4, context=CONTEXT)
build_model = task.build_model  # the demo's model, for tasks built on this one
task_3m = make_task(width=256, depth=4, heads=4, context=256)
