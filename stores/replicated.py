"""Several stores seen as one: write to each, read the newest checkpoint that verifies (the
nearest store first), and audit how many complete copies each epoch has.

A duty holder writes to the store of its own failure domain; the controller opens every
domain's store in one ReplicatedStore to list and audit them, and a restoring agent opens them
ordered nearest first, so a tie on the epoch is read from the cheapest, fastest store.

Every reader names its Trust (spotrain.stores.seal): a manifest it does not believe is not a
candidate, counts in no audit and takes no slot when a writer prunes. A writer names its signer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotrain.stores.base import CheckpointStore, Manifest, Sealer, StoreError, StoreUnavailable, Trust
from spotrain.stores.open import open_store
from spotrain.stores.payload import Constants, decode_state, encode_state, no_constants

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    epoch: int
    state: dict[str, Any]
    manifest: Manifest
    store_url: str


@dataclass(frozen=True)
class StoreAudit:
    url: str
    complete_epochs: tuple[int, ...]  # newest first
    error: str | None = None  # the store could not be listed

    @property
    def newest_epoch(self) -> int | None:
        return self.complete_epochs[0] if self.complete_epochs else None


@dataclass(frozen=True)
class ReplicaAudit:
    stores: tuple[StoreAudit, ...]

    def copies(self, epoch: int) -> int:
        """Stores (failure domains) that hold a complete copy of `epoch`."""
        return sum(epoch in store.complete_epochs for store in self.stores)

    def newest_epoch_with(self, copies: int) -> int | None:
        """The newest epoch held complete by at least `copies` stores."""
        epochs = {epoch for store in self.stores for epoch in store.complete_epochs}
        return max((epoch for epoch in epochs if self.copies(epoch) >= copies), default=None)


class ReplicatedStore:
    def __init__(self, stores: Sequence[CheckpointStore], *, trust: Trust, signer: Sealer | None = None):
        if not stores:
            raise ValueError("a replicated store needs at least one store")
        self.stores = tuple(stores)  # nearest first
        self.trust = trust  # which manifests count (no default: every reader decides)
        self.signer = signer  # seals what this store writes; None: unsigned

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, trust: Trust, signer: Sealer | None = None,
                  ) -> ReplicatedStore:
        return cls([open_store(url) for url in urls], trust=trust, signer=signer)

    def save_state(self, epoch: int, state: Mapping[str, Any], writer: str,
                   constants: Constants = no_constants) -> list[Manifest]:
        """Encode `state` (refusing a non-finite one) and write it to every store."""
        return self.write(epoch, encode_state(state, constants), writer)

    def write(self, epoch: int, files: Mapping[str, bytes], writer: str) -> list[Manifest]:
        """Write to every store; StoreUnavailable after trying them all if any failed (the
        copies that were written stay)."""
        written, failed = [], []
        for store in self.stores:
            try:
                written.append(store.write(epoch, files, writer, self.signer))
            except StoreError as error:
                failed.append(f"{store.url}: {error}")
        if failed:
            raise StoreUnavailable(f"epoch {epoch} written to {len(written)} of {len(self.stores)} stores; "
                                   + "; ".join(failed))
        return written

    def prune(self, keep: int, up_to: int | None = None) -> None:
        for store in self.stores:
            try:
                store.prune(keep, up_to, self.trust)
            except StoreError as error:
                log.warning("%s: prune failed: %s", store.url, error)

    def candidates(self) -> list[tuple[CheckpointStore, Manifest]]:
        """Every listed checkpoint the trust believes, newest epoch first, the nearest store first
        within an epoch; each one refused is logged (one line) and left out."""
        found: list[tuple[int, int, CheckpointStore, Manifest]] = []
        for rank, store in enumerate(self.stores):
            try:
                listed = store.manifests()
            except StoreError as error:
                log.warning("%s: cannot list checkpoints: %s", store.url, error)
                continue
            for manifest in listed:
                refusal = self.trust.refusal(manifest)
                if refusal is None:
                    found.append((-manifest.epoch, rank, store, manifest))
                else:
                    log.warning("%s: skipping checkpoint %s: %s", store.url, manifest.name, refusal)
        found.sort(key=lambda item: (item[0], item[1], -item[3].created_at))
        return [(store, manifest) for _, _, store, manifest in found]

    def load_newest(self, constants: Constants = no_constants) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies and loads safely, or None; every one refused on
        the way (torn, corrupt, unsafe, non-finite, unreachable) is logged and skipped."""
        for store, manifest in self.candidates():
            try:
                state = decode_state(store.read(manifest), constants)
            except StoreError as error:
                log.warning("%s: skipping checkpoint %s: %s", store.url, manifest.name, error)
                continue
            return LoadedCheckpoint(manifest.epoch, state, manifest, store.url)
        return None

    def audit(self) -> ReplicaAudit:
        """Per store, the epochs it holds complete (a believed manifest plus every file at its size)."""
        audits = []
        for store in self.stores:
            try:
                epochs = {m.epoch for m in store.manifests()
                          if self.trust.refusal(m) is None and store.is_complete(m)}
            except StoreError as error:
                audits.append(StoreAudit(store.url, (), str(error)))
                continue
            audits.append(StoreAudit(store.url, tuple(sorted(epochs, reverse=True))))
        return ReplicaAudit(tuple(audits))
