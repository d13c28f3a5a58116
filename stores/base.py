"""What every checkpoint store offers, the manifest that makes a checkpoint whole, and the errors.

A checkpoint is a set of files plus a manifest (epoch, every file's size and SHA-256, when and by
whom it was written). The manifest is written last, so a checkpoint without one does not exist
for readers, and a reader trusts a file only once its size and hash match the manifest. A
manifest is believed at all only when its seal says an admitted peer wrote it
(spotrain.stores.seal): whoever can write a store can write a manifest with valid hashes.

Layout under a store's root (a directory or a bucket prefix), one checkpoint per epoch and writer
(two duty holders sharing a store never overwrite each other's files):

    ckpt-00000015-<writer>.json          the manifest
    ckpt-00000015-<writer>/<file>        the files it lists
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_SAFE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}"  # no separators, never "." or ".."
SAFE_NAME = re.compile(f"^{_SAFE_NAME}$")
MANIFEST_KEY = re.compile(rf"^ckpt-(\d{{8,}})-({_SAFE_NAME})\.json$")


class StoreError(Exception):
    """Anything a checkpoint store refuses or fails to do."""


class StoreURLError(StoreError, ValueError):
    """A store URL that names no known scheme, or carries options the scheme does not take."""


class StoreUnavailable(StoreError):
    """The store could not be reached or refused the call (network, permissions, missing bucket/SDK)."""


class MissingObject(StoreError):
    """A file the manifest names is not in the store."""


class CorruptCheckpoint(StoreError):
    """A manifest that does not parse, or a file whose size or SHA-256 differs from the manifest."""


class UnsafePayload(StoreError):
    """A payload that would need code to load (anything beyond tensors, numbers, strings, containers)."""


class NonFiniteState(StoreError):
    """A state with a NaN or infinite value: never written, never loaded."""


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str = Field(pattern=SAFE_NAME.pattern)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Seal(BaseModel):
    """Who vouches for a manifest: the writer's public key (its admitted libp2p identity), the
    cluster-signed admission record that lists that key's peer id, and the writer's signature
    over the manifest's other fields (spotrain.stores.seal makes and checks it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    signer: str = Field(min_length=1, max_length=4096)  # RSA public key, OpenSSH form
    admission: dict[str, Any]  # the signed admission record (spotrain.contracts.admission)
    signature: str = Field(min_length=1, max_length=2048)  # base64 RSA-PSS/SHA-256


class Manifest(BaseModel):
    """A checkpoint's table of contents, parsed strictly: unknown fields, wrong types, a foreign
    format version or a non-finite time make it corrupt rather than half understood."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format_version: Literal[1] = 1
    epoch: int = Field(ge=0, lt=10**12)
    files: tuple[ManifestFile, ...]
    created_at: float = Field(gt=0, allow_inf_nan=False)
    writer: str = Field(pattern=SAFE_NAME.pattern)
    seal: Seal | None = None  # None: unsigned (planted, or written before spotrain signed manifests)

    @model_validator(mode="after")
    def _unique_files(self) -> Manifest:
        names = [entry.name for entry in self.files]
        if len(names) != len(set(names)):
            raise ValueError("a file is listed twice")
        return self

    @property
    def name(self) -> str:
        """The checkpoint's name in its store: epoch and writer."""
        return checkpoint_name(self.epoch, self.writer)

    @property
    def key(self) -> str:
        return f"{self.name}.json"

    def file_key(self, file_name: str) -> str:
        return f"{self.name}/{file_name}"

    def signed_fields(self) -> dict[str, Any]:
        """Everything but the seal: what the writer signs."""
        return self.model_dump(mode="json", exclude={"seal"})

    def to_json(self) -> bytes:
        # an unsigned manifest is written as before seals existed
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, key: str) -> Manifest:
        """The manifest stored under `key`; CorruptCheckpoint when it does not parse or does not
        belong to its own key (a manifest copied under another epoch's name)."""
        try:
            manifest = cls.model_validate_json(data, strict=True)
        except ValidationError as error:
            raise CorruptCheckpoint(f"{key}: bad manifest ({error.error_count()} errors: "
                                    f"{error.errors()[0]['msg']})") from None
        if manifest.key != key:
            raise CorruptCheckpoint(f"{key}: manifest is for {manifest.key}")
        return manifest

    @classmethod
    def describe(cls, epoch: int, writer: str, files: Mapping[str, bytes]) -> Manifest:
        """The manifest of `files` as they are now, written by `writer` at `epoch`."""
        entries = tuple(ManifestFile(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
                        for name, data in files.items())
        return cls(epoch=epoch, files=entries, created_at=time.time(), writer=writer)


def checkpoint_name(epoch: int, writer: str) -> str:
    return f"ckpt-{epoch:08d}-{writer}"


class Trust(Protocol):
    """Which manifests a reader believes (spotrain.stores.seal: those an admitted peer sealed)."""

    def refusal(self, manifest: Manifest) -> str | None:
        """None when the manifest is believed; else why not (one line, for the reader's log)."""
        ...


class Sealer(Protocol):
    """What seals the manifests a writer writes (spotrain.stores.seal.ManifestSigner)."""

    def seal(self, manifest: Manifest) -> Manifest:
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """A place that keeps checkpoints: a directory, an S3 prefix, a GCS prefix.

    Every method raises StoreUnavailable when the store cannot be reached."""

    url: str

    def write(self, epoch: int, files: Mapping[str, bytes], writer: str,
              signer: Sealer | None = None) -> Manifest:
        """Store `files` as `writer`'s checkpoint of `epoch`: the files first, the manifest (sealed
        by `signer`, when given) last."""
        ...

    def manifests(self) -> list[Manifest]:
        """Every checkpoint whose manifest parses, newest epoch first; broken manifests are skipped.
        Not yet believed: a reader asks its Trust (ReplicatedStore does)."""
        ...

    def is_complete(self, manifest: Manifest) -> bool:
        """Whether every file the manifest lists is present at its size (cheap: no download)."""
        ...

    def read(self, manifest: Manifest) -> dict[str, bytes]:
        """The checkpoint's files, each verified against the manifest's size and SHA-256
        (CorruptCheckpoint or MissingObject otherwise)."""
        ...

    def delete(self, manifest: Manifest) -> None:
        """Remove a checkpoint: its manifest first, so it is never visible half deleted."""
        ...

    def prune(self, keep: int, up_to: int | None = None, trust: Trust | None = None) -> list[Manifest]:
        """Keep the `keep` newest epochs that have a manifest (counting only epochs up to `up_to`,
        when given: a writer's own newest, so checkpoints planted ahead of it take no slot; and only
        manifests `trust` believes, when given, so planted ones take no slot either); remove
        everything older (files whose manifest never came too). Returns the checkpoints removed."""
        ...
