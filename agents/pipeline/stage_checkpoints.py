"""Checkpoints of one SWARM stage: who writes them, where, and how a replacement restores them.

A stage's parameters live only on its peers, so each stage is checkpointed on its own, under
`<store>/stage<i>` of every store the agent's user-data names (spotrain.stores: a path, S3, GCS).
Duty per stage: the stage's first serving peer by peer id (`stage_duty_holders`), a pure choice
every peer makes alike from the stage records, so when the holder drains (its record says so) the
next peer holds the duty at its next check, without the controller. A peer the controller gave
checkpoint duty (distinct failure domains) writes its stage too. A checkpoint's epoch is the
writer's optimizer step count, which a restore carries over, so the newest copy is the most
trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from spotrain.agents.pipeline.stage_server import StageServer
from spotrain.contracts.agent_config import CheckpointSettings
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState
from spotrain.stores import CheckpointWriter, LoadedCheckpoint, ManifestSigner, ReplicatedStore, Trust, named_constants

KEEP_CHECKPOINTS = 3


def stage_store_url(url: str, stage: int) -> str:
    """The stage's own folder (or key prefix) of a store URL: `/stage<i>` ends the path, before a
    bucket URL's options (`s3://b/run?endpoint=...` -> `s3://b/run/stage0?endpoint=...`; appended
    after them it lengthened the endpoint instead, and every stage's upload failed)."""
    if "://" not in url:  # a directory
        return f"{url.rstrip('/')}/stage{stage}"
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/stage{stage}"))


def stage_duty_holders(records: Sequence[StageRecord], stage: int, replicas: int = 1) -> list[str]:
    """The peer ids that checkpoint `stage`: its first `replicas` serving peers by peer id."""
    serving = sorted(r.peer_id for r in records if r.stage == stage and r.state == AgentState.TRAINING)
    return serving[:replicas]


class StageCheckpoints:
    def __init__(self, settings: CheckpointSettings, server: StageServer, writer_name: str,
                 trust: Trust, signer: ManifestSigner | None):
        self.server = server
        self.constants = named_constants(f"stage.{name}" for name, _ in server.module.named_buffers())
        self.trust = trust  # an admitted peer's manifests only (spotrain.stores.seal)
        self.urls = tuple(stage_store_url(url, server.stage) for url in settings.restore_order())
        target = ReplicatedStore.from_urls([stage_store_url(settings.store, server.stage)], trust=trust, signer=signer)
        self.writer = CheckpointWriter(target, writer_name, keep=KEEP_CHECKPOINTS, constants=self.constants)
        self.submitted: int | None = None

    def restore(self) -> LoadedCheckpoint | None:
        """Load the newest valid checkpoint of the stage, nearest store first, into the server."""
        loaded = ReplicatedStore.from_urls(self.urls, trust=self.trust).load_newest(self.constants)
        if loaded is None:
            return None
        state: dict[str, Any] = loaded.state
        server = self.server
        with server.lock:
            server.module.load_state_dict(state["stage"])
            server.optimizer.load_state_dict(state["optimizer"])
            server.steps = int(state["steps"])
        return loaded

    def submit(self) -> int | None:
        """Snapshot the stage (whole steps: under the compute lock) for a background upload; its epoch."""
        server = self.server
        with server.lock:
            if server.steps == self.submitted:
                return None  # nothing learned since the last one
            epoch = server.steps
            self.writer.submit(epoch, {"stage": server.module.state_dict(), "optimizer": server.optimizer.state_dict(),
                                       "steps": epoch})
        self.submitted = epoch
        return epoch

    def close(self, timeout: float) -> bool:
        """Finish the uploads; whether the last checkpoint submitted is in the store (an upload that
        failed is not written, however quickly it failed)."""
        finished = self.writer.close(timeout)
        return finished and (self.submitted is None or self.writer.last_written_epoch == self.submitted)
