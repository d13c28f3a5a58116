"""The agent's checkpoint calls (`save`, `load_newest`, `prune`, `epochs`), served by
`spotrain.stores`: any store `open_store` knows (a directory, s3://, gs://), manifests written
last, SHA-256 verified, weights-only loads, non-finite states refused.

Writes here are synchronous; `spotrain.stores.CheckpointWriter` is the background writer the
agent moves to when it is rewired onto the stores directly.
"""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

from spotrain.stores import Manifest, ReplicatedStore, open_store


def default_writer() -> str:
    """Names this process's checkpoints apart from other holders' writing the same store."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:100]


def additive_mask(path: str, tensor: torch.Tensor) -> bool:
    """A model tensor of only 0 and -inf: an attention-mask buffer, whose infinities are meant.
    The daemon hands this adapter state dicts, not its model, so it cannot name the buffers as
    a CheckpointWriter's caller does (`named_constants` over `model.named_buffers()`)."""
    return path.startswith("model.") and bool(((tensor == 0) | (tensor == -math.inf)).all())


class AgentCheckpoints:
    def __init__(self, url: str | Path, writer: str | None = None):
        self.store = open_store(str(url))
        self.replicas = ReplicatedStore([self.store])
        self.writer = writer or default_writer()

    @classmethod
    def from_url(cls, url: str) -> AgentCheckpoints:
        return cls(url)

    def save(self, epoch: int, state: dict[str, Any]) -> list[Manifest]:
        return self.replicas.save_state(epoch, state, self.writer, additive_mask)

    def epochs(self) -> list[int]:
        return sorted({manifest.epoch for manifest in self.store.manifests()}, reverse=True)

    def load_newest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies, its state parts plus "epoch", or None."""
        loaded = self.replicas.load_newest(additive_mask)
        return None if loaded is None else dict(loaded.state, epoch=loaded.epoch)

    def prune(self, keep: int) -> None:
        self.replicas.prune(keep)


LocalDirStore = AgentCheckpoints  # the name agents/daemon.py imports until it calls spotrain.stores itself
