"""The checkpoint logic every store shares, over four primitives on keys under the store's root:
put, get, list (with sizes), delete. A scheme (directory, S3, GCS) supplies only those, plus what
shipping a build to VMs needs (spotrain/shipping.py): an object's size, and a URL a VM fetches it at."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from spotrain.stores.base import MANIFEST_KEY, CorruptCheckpoint, Manifest, MissingObject, Sealer, StoreError, Trust

log = logging.getLogger(__name__)
# a checkpoint's manifest, its files, and what a crashed local write left (".ckpt-...tmp")
_CHECKPOINT_KEY = re.compile(r"^\.?ckpt-(\d{8,})-")
# an object key outside the checkpoints' layout: safe segments, never "." or "..", no leading slash
_OBJECT_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}(/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}){0,7}$")


@dataclass(frozen=True)
class FetchURL:
    """Where a VM downloads an object with nothing but an HTTP client (or a file read)."""

    url: str
    auth: Literal["none", "gce-metadata"] = "none"  # gce-metadata: the VM's service-account token


def check_object_key(key: str) -> str:
    if not _OBJECT_KEY.match(key):
        raise StoreError(f"unsafe object key {key!r}")
    return key


class BlobStore(ABC):
    url: str

    @abstractmethod
    def _put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` whole: a reader sees the old object, the new one, or none."""

    @abstractmethod
    def _get(self, key: str) -> bytes:
        """The object's bytes; MissingObject when there is none."""

    @abstractmethod
    def _list(self) -> dict[str, int]:
        """Every key under the root, with its size."""

    @abstractmethod
    def _delete(self, keys: Iterable[str]) -> None:
        """Remove the keys; a key already gone is fine."""

    @abstractmethod
    def _size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is none."""

    @abstractmethod
    def _fetch_url(self, key: str, expires_seconds: int) -> FetchURL:
        """A URL that serves the object to a VM for at least `expires_seconds`."""

    def put_object(self, key: str, data: bytes) -> None:
        """Store an object outside the checkpoints' layout (e.g. `code/<sha256>/<name>`): prune keeps it."""
        self._put(check_object_key(key), data)

    def get_object(self, key: str) -> bytes:
        return self._get(check_object_key(key))

    def object_size(self, key: str) -> int | None:
        return self._size(check_object_key(key))

    def fetch_url(self, key: str, expires_seconds: int) -> FetchURL:
        return self._fetch_url(check_object_key(key), expires_seconds)

    def write(self, epoch: int, files: Mapping[str, bytes], writer: str,
              signer: Sealer | None = None) -> Manifest:
        manifest = Manifest.describe(epoch, writer, files)
        if signer is not None:
            manifest = signer.seal(manifest)
        for name, data in files.items():
            self._put(manifest.file_key(name), data)
        self._put(manifest.key, manifest.to_json())  # last: only now does the checkpoint exist
        return manifest

    def manifests(self) -> list[Manifest]:
        found = []
        for key in self._list():
            if not MANIFEST_KEY.match(key):
                continue
            try:
                found.append(Manifest.parse(self._get(key), key))
            except (CorruptCheckpoint, MissingObject) as error:  # deleted meanwhile, or garbage
                log.warning("%s: skipping %s", self.url, error)
        return sorted(found, key=lambda m: (m.epoch, m.created_at), reverse=True)

    def is_complete(self, manifest: Manifest) -> bool:
        sizes = self._list()
        return manifest.key in sizes and all(sizes.get(manifest.file_key(entry.name)) == entry.size
                                             for entry in manifest.files)

    def read(self, manifest: Manifest) -> dict[str, bytes]:
        files = {}
        for entry in manifest.files:
            key = manifest.file_key(entry.name)
            data = self._get(key)
            if len(data) != entry.size:
                raise CorruptCheckpoint(f"{self.url}/{key}: {len(data)} bytes, "
                                        f"the manifest says {entry.size}")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise CorruptCheckpoint(f"{self.url}/{key}: SHA-256 differs from the manifest")
            files[entry.name] = data
        return files

    def delete(self, manifest: Manifest) -> None:
        self._delete([manifest.key])
        self._delete([manifest.file_key(entry.name) for entry in manifest.files])

    def prune(self, keep: int, up_to: int | None = None, trust: Trust | None = None) -> list[Manifest]:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        manifests = self.manifests()
        epochs = sorted({m.epoch for m in manifests if (up_to is None or m.epoch <= up_to)
                         and (trust is None or trust.refusal(m) is None)}, reverse=True)
        if len(epochs) <= keep:
            return []
        oldest_kept = epochs[keep - 1]
        # everything of an older epoch goes, manifests first: broken manifests and the files of
        # writes that crashed before their manifest too. Newer leftovers may be a write in flight.
        # Keys that are no checkpoint's (someone else's objects under the prefix) stay.
        stale = [key for key in self._list() if _epoch_of(key) < oldest_kept]
        self._delete([key for key in stale if MANIFEST_KEY.match(key)])
        self._delete([key for key in stale if not MANIFEST_KEY.match(key)])
        return [m for m in manifests if m.epoch < oldest_kept]


def _epoch_of(key: str) -> float:
    """The epoch a checkpoint's key belongs to; infinite for a key that is no checkpoint's."""
    found = _CHECKPOINT_KEY.match(key)
    return int(found.group(1)) if found else math.inf
